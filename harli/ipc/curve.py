"""ZMQ CURVE for TCP endpoints: encryption and, with an authorized-keys directory, client
authentication. ipc:// endpoints rely on the runtime dir's file permissions instead.

Keys are zmq.auth certificate files (``harli keys DIR`` writes a pair): the daemon holds a
secret certificate; clients need the daemon's public certificate and may present their own.
"""

from __future__ import annotations

from typing import Any

import zmq
import zmq.auth


def apply_server(sock: zmq.Socket[Any], secret_cert: str) -> None:
    public, secret = zmq.auth.load_certificate(secret_cert)
    if secret is None:
        raise ValueError(f"{secret_cert} holds no secret key; give the *.key_secret file")
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def apply_client(sock: zmq.Socket[Any], server_public_cert: str,
                 client_secret_cert: str | None = None) -> None:
    server_public, _ = zmq.auth.load_certificate(server_public_cert)
    if client_secret_cert:
        public, secret = zmq.auth.load_certificate(client_secret_cert)
        if secret is None:
            raise ValueError(f"{client_secret_cert} holds no secret key")
    else:  # an ephemeral identity: enough when the daemon accepts any client
        public, secret = zmq.curve_keypair()
    sock.curve_serverkey = server_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def start_authenticator(ctx: zmq.Context[Any], authorized_keys_dir: str) -> Any:
    """Only clients whose public certificate is in ``authorized_keys_dir`` may connect."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=authorized_keys_dir)
    return auth


def create_keys(directory: str, name: str) -> tuple[str, str]:
    """Write ``name.key`` (public) and ``name.key_secret`` into ``directory``."""
    import os

    os.makedirs(directory, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    return str(public), str(secret)
