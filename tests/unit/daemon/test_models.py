"""The ``ModelCatalog`` with the inference ``Frontend``: a request's ``model`` resolved to the
adapter decode serves it with or refused naming the known models; adapters added, listed and
removed (refused while in use unless forced); finished jobs and published checkpoints
registered; the registry read again after a restart. A real SQLite registry, fake sockets."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from harli.config import load
from harli.daemon.adapter_registry import AdapterRegistry
from harli.daemon.models import ModelCatalog, UnknownModel
from harli.ipc.control import AddAdapter, ListModels, ModelInfo, RemoveAdapter
from harli.ipc.decode import AbortRequests, AddRequest, LoraTarget, StepOutputs, UnloadAdapter
from harli.ipc.inference import Chunk, Error, ErrorCode, Generate
from tests.unit.test_adapters import adapter_dir, model_dir

from .test_frontend import Harness, error_of


class World:
    """A catalog on a fresh registry for a served model ``tiny``, wired to a frontend."""

    def __init__(self, tmp: Path, lora_enabled: bool = True) -> None:
        self.tmp = tmp
        self.base = model_dir(tmp)
        self.cfg = load(None, [f'model.path="{self.base}"',
                               f"lora.enabled={'true' if lora_enabled else 'false'}"])
        self.db = sqlite3.connect(tmp / "jobs.sqlite", isolation_level=None)
        self.sent: list[Any] = []
        self.events: list[tuple[int, str, str]] = []
        self.served_as: list[tuple[int, str]] = []
        self.catalog = ModelCatalog(self.cfg, AdapterRegistry(self.db), self._send,
                                    lambda *e: self.events.append(e),
                                    lambda *m: self.served_as.append(m))
        self.h = Harness()
        self.h.fe.resolve_model = self.catalog.resolve
        self.h.fe.on_loras_loaded = self.catalog.on_loaded

    def _send(self, msg: Any) -> bool:
        self.sent.append(msg)
        return True

    def adapter(self, name: str = "ad") -> str:
        return str(adapter_dir(self.tmp, str(self.base), name))

    def in_use(self) -> dict[str, int]:
        return {n or self.catalog.base_name: c
                for n, c in self.h.fe.requests.by_model().items()}

    def remove(self, name: str, force: bool = False) -> ModelInfo | Error:
        return self.catalog.remove(RemoveAdapter(name=name, force=force), self.in_use(),
                                   self.h.fe.end_adapter_requests)


def test_a_request_names_the_base_model_or_a_registered_adapter(tmp_path: Path) -> None:
    w = World(tmp_path)
    info = w.catalog.add(AddAdapter(name="digits", path=w.adapter()))
    assert isinstance(info, ModelInfo) and info.kind == "adapter" and info.rank == 8
    for model in (None, "tiny", str(w.base)):
        add = w.h.generate(b"c", f"base-{model}", model=model)
        assert isinstance(add, AddRequest) and add.lora is None
    add = w.h.generate(b"c", "x", model="digits")
    assert isinstance(add, AddRequest)
    assert add.lora == LoraTarget(name="digits", lora_id=1, path=info.path)
    assert w.in_use() == {"tiny": 3, "digits": 1}


def test_an_unknown_model_is_refused_naming_the_models_served(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.catalog.add(AddAdapter(name="digits", path=w.adapter()))
    err = error_of(w.h.send(b"c", Generate(request_id="r", prompt_token_ids=[1],
                                           model="digitz")))
    assert err.code == ErrorCode.UNKNOWN_MODEL and err.request_id == "r"
    assert err.message == "unknown model 'digitz'; this daemon serves 'tiny', 'digits'"
    assert not w.h.to_decode and not len(w.h.fe.requests)


def test_with_lora_off_an_adapter_is_refused_and_jobs_are_not_registered(
        tmp_path: Path) -> None:
    w = World(tmp_path, lora_enabled=False)
    w.catalog.registry.add("digits", __import__("harli.adapters").adapters.inspect_adapter(
        w.adapter(), base_model_dir=w.base, max_rank=16), "path")
    w2 = ModelCatalog(w.cfg, AdapterRegistry(w.db), w._send, lambda *e: None)
    with pytest.raises(UnknownModel, match=r"lora.enabled = false"):
        w2.resolve("digits")
    w2.on_job_succeeded(1, "job", w.adapter("j"))
    assert w2.names() == ["tiny", "digits"]
    err = w2.add(AddAdapter(name="new", path=w.adapter("n")))
    assert isinstance(err, Error) and "lora.enabled = false" in err.message


def test_adding_refuses_taken_names_checkpoint_names_and_bad_directories(
        tmp_path: Path) -> None:
    w = World(tmp_path)
    path = w.adapter()
    assert isinstance(w.catalog.add(AddAdapter(name="digits", path=path)), ModelInfo)
    for name, code, words in (("digits", ErrorCode.CONFLICT, "the name 'digits' is taken "
                               "(an adapter's)"),
                              ("tiny", ErrorCode.CONFLICT, "(the base model's)"),
                              ("x@step-5", ErrorCode.INVALID, "published job checkpoints")):
        err = w.catalog.add(AddAdapter(name=name, path=path))
        assert isinstance(err, Error) and err.code == code and words in err.message
    err = w.catalog.add(AddAdapter(name="gone", path=str(tmp_path / "nothing")))
    assert isinstance(err, Error) and err.code == ErrorCode.INVALID
    assert "does not exist" in err.message
    assert w.catalog.names() == ["tiny", "digits"]  # nothing registered lost or added


@pytest.mark.parametrize(("path", "words"), [
    ("/tmp/a\x00b", "NUL"), ("/tmp/" + "a" * 300, "component of 300 bytes"),
    ("/" + "a/" * 2100, "over the limit of 4095 bytes")])
def test_a_path_that_names_no_file_is_invalid_not_an_internal_error(
        tmp_path: Path, path: str, words: str) -> None:
    # A component over NAME_MAX once escaped as OSError (ENAMETOOLONG) from the directory
    # check, an internal error to the client (a 500 over HTTP).
    w = World(tmp_path)
    err = w.catalog.add(AddAdapter(name="odd", path=path))
    assert isinstance(err, Error) and err.code == ErrorCode.INVALID, err
    assert words in err.message
    assert w.catalog.names() == ["tiny"]


def test_an_unreadable_adapter_directory_is_invalid(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    w = World(tmp_path)

    def denied(*_: object, **__: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("harli.daemon.models.inspect_adapter", denied)
    err = w.catalog.add(AddAdapter(name="odd", path=w.adapter()))
    assert isinstance(err, Error) and err.code == ErrorCode.INVALID, err
    assert "Permission denied" in err.message


def test_an_adapter_in_use_is_removed_only_by_force_which_ends_its_requests(
        tmp_path: Path) -> None:
    w = World(tmp_path)
    w.catalog.add(AddAdapter(name="digits", path=w.adapter()))
    a = w.h.generate(b"c", "a", model="digits")
    base = w.h.generate(b"c", "b")
    assert a is not None and base is not None
    err = w.remove("digits")
    assert isinstance(err, Error) and err.code == ErrorCode.CONFLICT
    assert "serving 1 request(s)" in err.message and "--force" in err.message
    gone = w.remove("digits", force=True)
    assert isinstance(gone, ModelInfo) and gone.requests == 1
    assert AbortRequests(rids=[a.rid]) in w.h.to_decode
    (last,) = [m for m in w.h.sock.replies(b"c") if isinstance(m, Chunk)]
    assert last.request_id == "a" and last.finish_reason == "adapter_removed"
    assert w.sent == [UnloadAdapter(lora_id=1)]
    assert w.h.fe.requests.get(base.rid) is not None  # the base model's request goes on
    err = w.remove("digits")
    assert isinstance(err, Error) and err.code == ErrorCode.NOT_FOUND
    err = w.remove("tiny")
    assert isinstance(err, Error) and "the base model, which cannot be removed" in err.message


def test_finished_jobs_and_published_checkpoints_become_servable(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.catalog.on_checkpoint(7, "digits", 50, w.adapter("ck50"))
    w.catalog.on_job_succeeded(7, "digits", w.adapter("final"))
    assert w.catalog.names() == ["tiny", "digits@step-50", "digits"]
    assert [e[2] for e in w.events] == ["served as model 'digits@step-50' (lora id 1)",
                                        "served as model 'digits' (lora id 2)"]
    assert w.served_as == [(7, "digits")]  # the job's fine_tuned_model; not a checkpoint
    models = w.catalog.list_models(ListModels(), {"digits": 2}).models
    assert [(m.name, m.source, m.job_id, m.step, m.requests) for m in models] == [
        ("tiny", "model", None, None, 0), ("digits@step-50", "checkpoint", 7, 50, 0),
        ("digits", "job", 7, None, 2)]
    # A job whose adapter is damaged, or whose name is taken, is not served: its log says why.
    broken = Path(w.adapter("broken"))
    (broken / "adapter_model.safetensors").write_bytes(b"\0" * 4)
    w.catalog.on_job_succeeded(8, "other", str(broken))
    w.catalog.on_job_succeeded(9, "digits", w.adapter("again"))
    w.catalog.on_job_succeeded(10, "nothing", None)
    assert [e[2] for e in w.events[2:]] == [
        f"not served as other: {broken / 'adapter_model.safetensors'} is 4 bytes: cut short "
        f"before its header",
        "not served as digits: the name is taken by another model",
        "not served as nothing: the job saved no adapter"]


def test_the_registry_outlives_the_daemon_and_decode_reports_what_it_loaded(
        tmp_path: Path) -> None:
    w = World(tmp_path)
    w.catalog.add(AddAdapter(name="digits", path=w.adapter()))
    w.h.fe.on_step_outputs(StepOutputs(incarnation=1, iteration=1, end_wall_s=0.0,
                                       outputs=[], loras_loaded=[1]))
    (m,) = [x for x in w.catalog.list_models(ListModels(), {}).models if x.name == "digits"]
    assert m.loaded
    w.catalog.on_decode_exit()
    (m,) = [x for x in w.catalog.list_models(ListModels(), {}).models if x.name == "digits"]
    assert not m.loaded
    again = ModelCatalog(w.cfg, AdapterRegistry(w.db), w._send, lambda *e: None)
    assert again.resolve("digits") == w.catalog.resolve("digits")
