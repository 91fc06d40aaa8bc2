"""Adapter directories checked before registration, and the registry that keeps them: every
bad directory refused with a message naming its problem; names and vLLM ids never reused."""

from __future__ import annotations

import json
import sqlite3
import struct
from pathlib import Path

import pytest

from harli.adapters import AdapterError, inspect_adapter
from harli.daemon.adapter_registry import AdapterRegistry, DuplicateAdapter

MODEL_CONF = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 512}


def model_dir(root: Path, name: str = "tiny", **conf: object) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({**MODEL_CONF, **conf}))
    return d


def safetensors(tensors: dict[str, tuple[list[int], int]]) -> bytes:
    """A safetensors file of float32 zeros: name -> (shape, element count)."""
    header: dict[str, object] = {}
    offset = 0
    for name, (shape, n) in tensors.items():
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + 4 * n]}
        offset += 4 * n
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * offset


def adapter_dir(root: Path, base: str, name: str = "ad", r: int = 8, **conf: object) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q_proj"],
         "base_model_name_or_path": base, **conf}))
    (d / "adapter_model.safetensors").write_bytes(safetensors(
        {"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": ([r, 64], r * 64)}))
    return d


def test_a_good_adapter_is_read(tmp_path: Path) -> None:
    base = model_dir(tmp_path)
    info = inspect_adapter(adapter_dir(tmp_path, str(base)), base_model_dir=base, max_rank=16)
    assert (info.rank, info.alpha, info.target_modules) == (8, 16.0, ("q_proj",))
    assert info.path == str((tmp_path / "ad").resolve()) and info.weights_bytes > 8 * 64 * 4
    # The same shapes elsewhere (a copy of the model) and a bare name of the served model fit.
    twin = model_dir(tmp_path, "copy")
    inspect_adapter(adapter_dir(tmp_path, str(twin), "b"), base_model_dir=base, max_rank=16)
    inspect_adapter(adapter_dir(tmp_path, "org/tiny", "c"), base_model_dir=base, max_rank=16)


@pytest.mark.parametrize(("setup", "message"), [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), "holds no adapter_config.json"),
    (lambda d: (d.mkdir(), (d / "adapter_config.json").write_text("{\"r\": 8,")),
     "not valid JSON"),
    (lambda d: (d.mkdir(), (d / "adapter_config.json").write_text("[1]")), "a JSON object"),
])
def test_not_an_adapter(tmp_path: Path, setup: object, message: str) -> None:
    base = model_dir(tmp_path)
    d = tmp_path / "missing"
    setup(d)  # type: ignore[operator]
    with pytest.raises(AdapterError, match=message):
        inspect_adapter(d, base_model_dir=base, max_rank=16)


def test_relative_paths_and_files_are_refused(tmp_path: Path) -> None:
    base = model_dir(tmp_path)
    with pytest.raises(AdapterError, match="must be absolute"):
        inspect_adapter("adapters/x", base_model_dir=base, max_rank=16)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(AdapterError, match="is not a directory"):
        inspect_adapter(f, base_model_dir=base, max_rank=16)


def test_rank_kind_and_fields_are_checked(tmp_path: Path) -> None:
    base = model_dir(tmp_path)
    with pytest.raises(AdapterError, match=r"rank 32, above the highest rank decode serves "
                                           r"\(16, lora.max_lora_rank\)"):
        inspect_adapter(adapter_dir(tmp_path, str(base), "r32", r=32), base_model_dir=base,
                        max_rank=16)
    with pytest.raises(AdapterError, match="peft_type is 'IA3'"):
        inspect_adapter(adapter_dir(tmp_path, str(base), "ia3", peft_type="IA3"),
                        base_model_dir=base, max_rank=16)
    with pytest.raises(AdapterError, match="target_modules must be"):
        inspect_adapter(adapter_dir(tmp_path, str(base), "tm", target_modules=[]),
                        base_model_dir=base, max_rank=16)
    d = adapter_dir(tmp_path, str(base), "rs")
    conf = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**conf, "r": "8"}))
    with pytest.raises(AdapterError, match="r must be an integer"):
        inspect_adapter(d, base_model_dir=base, max_rank=16)


def test_an_adapter_of_another_base_model_is_refused(tmp_path: Path) -> None:
    base = model_dir(tmp_path)
    other = model_dir(tmp_path, "big", hidden_size=128)
    with pytest.raises(AdapterError, match=r"trained on base model .*big, not the served model"):
        inspect_adapter(adapter_dir(tmp_path, str(other)), base_model_dir=base, max_rank=16)
    with pytest.raises(AdapterError, match="'meta-llama/Llama-3-8B', not the served model "
                                           "'tiny'"):
        inspect_adapter(adapter_dir(tmp_path, "meta-llama/Llama-3-8B", "b"),
                        base_model_dir=base, max_rank=16)
    with pytest.raises(AdapterError, match="names no base_model_name_or_path"):
        inspect_adapter(adapter_dir(tmp_path, "", "c"), base_model_dir=base, max_rank=16)


def test_half_written_weights_are_refused(tmp_path: Path) -> None:
    base = model_dir(tmp_path)
    d = adapter_dir(tmp_path, str(base))
    w = d / "adapter_model.safetensors"
    whole = w.read_bytes()
    w.write_bytes(whole[:-100])
    with pytest.raises(AdapterError, match="cut short"):
        inspect_adapter(d, base_model_dir=base, max_rank=16)
    w.write_bytes(whole[:5])
    with pytest.raises(AdapterError, match="cut short before its header"):
        inspect_adapter(d, base_model_dir=base, max_rank=16)
    w.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 10)
    with pytest.raises(AdapterError, match="header is not valid JSON"):
        inspect_adapter(d, base_model_dir=base, max_rank=16)
    w.unlink()
    with pytest.raises(AdapterError, match=r"holds no adapter_model\.safetensors"):
        inspect_adapter(d, base_model_dir=base, max_rank=16)


def test_the_registry_keeps_names_unique_and_never_reuses_an_id(tmp_path: Path) -> None:
    base = model_dir(tmp_path)
    info = inspect_adapter(adapter_dir(tmp_path, str(base)), base_model_dir=base, max_rank=16)
    db = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
    reg = AdapterRegistry(db, clock=lambda: 5.0)
    a = reg.add("digits", info, "job", job_id=3)
    assert (a.lora_id, a.name, a.source, a.job_id, a.rank, a.created_s) == \
        (1, "digits", "job", 3, 8, 5.0)
    with pytest.raises(DuplicateAdapter):
        reg.add("digits", info, "path")
    b = reg.add("digits@step-10", info, "checkpoint", job_id=3, step=10)
    assert b.lora_id == 2 and reg.names() == ["digits", "digits@step-10"]
    assert reg.remove("digits") == a and reg.get("digits") is None
    assert reg.remove("digits") is None
    again = reg.add("digits", info, "path")
    assert again.lora_id == 3  # a new id: vLLM's cache can never serve the old weights
    # It lives in the database: a new registry on the same file sees the same adapters.
    db.close()
    reg2 = AdapterRegistry(sqlite3.connect(tmp_path / "jobs.db", isolation_level=None))
    assert [x.name for x in reg2.all()] == ["digits@step-10", "digits"]
