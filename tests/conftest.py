"""Tiny random models of every supported family, built here, and a tokenizer trained on the fly: no hub, no
downloads; the checks several test modules share."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through Triton's interpreter, which must be on before triton is imported
    # (transformers' model modules import it).
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen3Config)

from larosa.fold import save_folded  # noqa: E402  (after the Triton switch above)
from larosa.runtime import Engine, Transformer  # noqa: E402

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
    if arch == "gemma3":  # queries wider than the hidden size, a window shorter than the tests' sequences, a biting cap
        return Gemma3TextConfig(**common, head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
                                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                final_logit_softcapping=0.5)
    if arch == "phi3":  # rotary on half of each head, as Phi-4-mini's on three quarters; no token ids past vocab
        return Phi3Config(**common, partial_rotary_factor=0.5, pad_token_id=None, bos_token_id=None,
                          eos_token_id=None)
    raise ValueError(arch)


def tiny_model(arch: str, tie: bool = False, seed: int = 0, vocab: int = 96):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tie, vocab), dtype=torch.float32).eval()
    offset = 1.0 if arch == "gemma3" else 0.0  # Gemma's norms multiply by 1 + weight
    with torch.no_grad():  # random norm gains, so gain handling is exercised, and non-zero Qwen2 biases
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5 - offset, 1.5 - offset)
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


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def loads_bit_exact(folded, path: Path, windows: torch.Tensor):
    """Saved and loaded with transformers' Auto class: the same weights and logits, bit for bit; the loaded model."""
    loaded = AutoModelForCausalLM.from_pretrained(save_folded(folded, None, path))
    with torch.no_grad():
        assert torch.equal(loaded(windows).logits, folded(windows).logits)
    a, b = folded.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return loaded


def decodes_as_hf(hf, tol: float, prefill: int = 12, total: int = 20) -> Engine:
    """Prefill then decode one token at a time in the engine, against the HF model's logits on the same tokens."""
    tokens = random_windows(1, seq_len=total)[0]
    with torch.no_grad():
        ref = hf(tokens[None]).logits[0]
    engine = Engine(Transformer.from_hf(hf, max_seq=32))
    assert relative_error(engine.model(tokens[:prefill], torch.arange(prefill)), ref[:prefill]) < tol
    for pos in range(prefill, total):
        assert relative_error(engine.step(tokens[pos : pos + 1], pos), ref[pos : pos + 1]) < tol
    return engine


def graph_decodes_as_hf(hf, tol: float, compile: bool = False, prefill: int = 12, total: int = 20) -> Engine:
    """On the GPU: prefill, then decode one token at a time through the CUDA graph (the Triton kernels at batch 1),
    each step's logits against the HF model's on the same tokens."""
    tokens = random_windows(1, seq_len=total)[0].cuda()
    with torch.no_grad():
        ref = hf(tokens[None]).logits[0].float()
    engine = Engine(Transformer.from_hf(hf, max_seq=32), compile=compile)
    assert engine.graph is not None
    engine.model(tokens[:prefill], torch.arange(prefill, device="cuda"))
    for pos in range(prefill, total):
        assert relative_error(engine.step(tokens[pos : pos + 1], pos), ref[pos : pos + 1]) < tol
    return engine


def generates_as_hf(hf, max_seq: int = 32, new_tokens: int = 12):
    """The engine's greedy generation from a 6-token prompt, asserted equal to transformers' token for token."""
    prompt = random_windows(1, seq_len=6)[0]
    got = Engine(Transformer.from_hf(hf, max_seq=max_seq)).generate(prompt, new_tokens)
    ref = hf.generate(prompt[None], max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[0]
    assert torch.equal(got.tokens, ref)
    return got


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
