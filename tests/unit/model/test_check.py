"""The model-directory check: each missing piece is named, with the setting it came from."""

from __future__ import annotations

from pathlib import Path

import pytest

from harli.model.check import ModelDirError, check_model_dir


def _model(d: Path, *names: str) -> Path:
    d.mkdir()
    for n in names:
        (d / n).write_text("{}")
    return d


def test_a_complete_directory_passes(tmp_path: Path) -> None:
    check_model_dir(_model(tmp_path / "m", "config.json", "model.safetensors", "tokenizer.json"))


@pytest.mark.parametrize(("names", "missing"), [
    ((), "config.json"),
    (("config.json", "tokenizer.json"), "*.safetensors"),
    (("config.json", "model.safetensors"), "tokenizer files"),
])
def test_each_missing_piece_is_named(tmp_path: Path, names: tuple[str, ...],
                                     missing: str) -> None:
    m = _model(tmp_path / "m", *names)
    with pytest.raises(ModelDirError, match=r"model\.path") as e:
        check_model_dir(m)
    assert missing in str(e.value) and str(m) in str(e.value)


def test_a_missing_or_non_directory_path(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="no such directory"):
        check_model_dir(tmp_path / "absent")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ModelDirError, match="not a directory"):
        check_model_dir(tmp_path / "f")
