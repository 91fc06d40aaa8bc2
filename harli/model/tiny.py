"""The tiny Llama model that the project generates for itself (no hub downloads here).

``init_tiny(dir, seed)`` writes a Llama-architecture model with random weights (safetensors and
config, loadable offline by vLLM and transformers) and a byte-level BPE tokenizer trained with
``tokenizers`` on the text bundled in ``harli/model/corpus``. The same seed gives byte-identical
files, so tests and benchmarks on two machines run the same model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]

# A minimal chat template so chat datasets and chat clients have something to render with; the
# finetune's default template for tokenizers without one is documented separately.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the generated model: small enough that 2 CPU cores decode it in a few ms."""

    vocab_size: int = 512
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 2048
    dtype: str = "float32"
    # Larger than Llama's 0.02: with 0.02 and a frozen lm_head the logits of a random model
    # cannot leave a +-5 range, so LoRA can't push a response token's loss much below 3
    # (measured: 6.1 -> 3.0 even when overfitting one batch). At 0.1 the same batch overfits
    # to 1e-4 and the sample digits task goes 4.8 -> 0.8 in 150 steps.
    initializer_range: float = 0.1


def spec_tag(spec: TinyModelSpec | None = None) -> str:
    """A short digest of the model's shape and init, part of its directory name, so that a
    changed spec generates a new model instead of silently reusing an old one."""
    blob = json.dumps((spec or TinyModelSpec()).__dict__, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:8]


def corpus_text() -> str:
    """The text the tokenizer is trained on, shipped inside the package."""
    files = sorted(
        (f for f in resources.files("harli.model").joinpath("corpus").iterdir()
         if f.name.endswith(".txt")),
        key=lambda f: f.name,
    )
    return "\n".join(f.read_text(encoding="utf-8") for f in files)


def train_tokenizer(vocab_size: int) -> object:
    """Train a byte-level BPE tokenizer on the bundled corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = corpus_text().splitlines()
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def init_tiny(out_dir: str | os.PathLike[str], seed: int = 0,
              spec: TinyModelSpec | None = None) -> Path:
    """Write the tiny model and tokenizer to ``out_dir`` atomically; return the directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    spec = spec or TinyModelSpec()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose an empty or new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model is readable like any other
    try:
        tok = train_tokenizer(spec.vocab_size)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
            pad_token="<|pad|>", model_max_length=spec.max_position_embeddings,
        )
        fast.chat_template = CHAT_TEMPLATE
        fast.save_pretrained(tmp)

        config = LlamaConfig(
            vocab_size=spec.vocab_size,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads,
            max_position_embeddings=spec.max_position_embeddings,
            bos_token_id=fast.bos_token_id,
            eos_token_id=fast.eos_token_id,
            pad_token_id=fast.pad_token_id,
            tie_word_embeddings=False,
            initializer_range=spec.initializer_range,
            dtype=spec.dtype,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(getattr(torch, spec.dtype))
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "harli_tiny.json").write_text(
            json.dumps({"seed": seed, "spec": spec.__dict__}, indent=2) + "\n"
        )
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("[model] wrote tiny model (seed %d) to %s", seed, out)
    return out


def ensure_tiny(out_dir: Path, seed: int = 0) -> Path:
    """Create the tiny model at ``out_dir`` unless a complete one is already there."""
    if (out_dir / "config.json").exists() and (out_dir / "tokenizer.json").exists():
        return out_dir
    return init_tiny(out_dir, seed)


def tree_digest(model_dir: Path) -> str:
    """SHA-256 over the model files, to check determinism and to key profiles on a model."""
    h = hashlib.sha256()
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()
