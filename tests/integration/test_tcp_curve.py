"""A tcp:// inference endpoint is CURVE-encrypted and, with authorized keys, admits only the
clients whose certificates are listed."""

from __future__ import annotations

from pathlib import Path

import pytest

from harli.client.inference import InferenceClient, RequestError
from harli.ipc.curve import create_keys

from .conftest import make_daemon
from .test_finetune import free_port

pytestmark = [pytest.mark.integration, pytest.mark.multiproc, pytest.mark.slow]


def test_tcp_endpoint_needs_the_servers_key_and_an_authorized_client_key(
        tmp_path: Path, tiny_model: Path) -> None:
    _, server_secret = create_keys(str(tmp_path / "server"), "server")
    server_public = str(tmp_path / "server" / "server.key")
    _, client_secret = create_keys(str(tmp_path / "clients"), "alice")
    _, stranger_secret = create_keys(str(tmp_path / "others"), "mallory")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with make_daemon(tmp_path / "d", tiny_model, f'endpoints.inference="{endpoint}"',
                     f'endpoints.curve_server_key="{server_secret}"',
                     f'endpoints.curve_authorized_keys="{tmp_path / "clients"}"',
                     client_key=client_secret) as d:
        assert d.endpoint == endpoint
        with InferenceClient(endpoint, server_key=server_public,
                             client_key=client_secret) as alice:
            assert alice.hello().ready
            out = alice.complete([1, 2, 3], max_tokens=4, ignore_eos=True)
            assert len(out.token_ids) == 4
        # No reply reaches a client without CURVE, or with a key the daemon does not know.
        with InferenceClient(endpoint, timeout_s=3) as plain, \
                pytest.raises(RequestError, match="timeout"):
            plain.hello()
        with InferenceClient(endpoint, timeout_s=3, server_key=server_public,
                             client_key=stranger_secret) as mallory, \
                pytest.raises(RequestError, match="timeout"):
            mallory.hello()
