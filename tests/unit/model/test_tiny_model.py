"""The generated tiny model: deterministic per seed, loadable offline by transformers."""

from __future__ import annotations

from pathlib import Path

import pytest

from harli.model.tiny import init_tiny, tree_digest


@pytest.mark.slow
def test_same_seed_same_bytes_and_loads_in_transformers(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = init_tiny(tmp_path / "a", seed=1)
    b = init_tiny(tmp_path / "b", seed=1)
    c = init_tiny(tmp_path / "c", seed=2)
    assert tree_digest(a) == tree_digest(b) != tree_digest(c)
    tok = AutoTokenizer.from_pretrained(a)
    text = "The river ran past the old mill."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and max(ids) < 512
    model = AutoModelForCausalLM.from_pretrained(a)
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 256
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 512)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.endswith("<|assistant|>\n")


def test_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        init_tiny(tmp_path / "x")
    assert (tmp_path / "x" / "f").read_text() == "keep me"
