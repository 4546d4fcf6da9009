"""Tiny random models of every family, built here, and a tokenizer trained on the fly: no hub, no downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through Triton's interpreter, which must be on before triton is imported
    # (transformers' model modules import it).
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, Phi3Config, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen3Config)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TEXT = (
    "The rotation concentrates the signal of each layer in a few coordinates, so keeping the largest entries "
    "of every token loses little. A fixed number of kept entries gives a fixed and predictable speed-up. "
) * 40


def tiny_config(arch: str, tie: bool = False, vocab: int = 96):
    common = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=tie,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=128)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=16)
    if arch == "phi3":  # rotary on half of each head, as Phi-4-mini's on three quarters; no token ids past vocab
        return Phi3Config(**common, partial_rotary_factor=0.5, pad_token_id=None, bos_token_id=None,
                          eos_token_id=None)
    raise ValueError(arch)


def tiny_model(arch: str, tie: bool = False, seed: int = 0, vocab: int = 96):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tie, vocab), dtype=torch.float32).eval()
    with torch.no_grad():  # random norm gains, so gain handling is exercised, and non-zero Qwen2 biases
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


ARCHS = [("llama", False), ("llama", True), ("qwen2", True), ("qwen2", False)]


@pytest.fixture(params=ARCHS, ids=lambda a: f"{a[0]}-{'tied' if a[1] else 'untied'}")
def model(request):
    return tiny_model(*request.param)


def random_windows(n: int = 3, seq_len: int = 32, vocab: int = 96, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq_len), generator=g)


def train_tokenizer(text: str, vocab: int = 96) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def saved_tiny(path: Path, arch: str = "llama", shard: str = "1GB", tie: bool = False) -> str:
    """A tiny model and its tokenizer saved as a safetensors checkpoint (sharded when ``shard`` is small), as
    load_lazy reads them."""
    tokenizer = train_tokenizer(TEXT)
    tiny_model(arch, tie=tie, vocab=len(tokenizer)).save_pretrained(path, max_shard_size=shard)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def model_dir(tmp_path):
    """A saved tiny Llama with a tokenizer and a text file to calibrate and evaluate on."""
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    return Path(saved_tiny(tmp_path / "tiny-llama"))
