"""Text in, text out: a prompt (optionally in the tokenizer's chat template) continued by the decode engine, the
text streamed as it is produced."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from ..errors import LarosaError
from ..streaming import check_finite
from .engine import Engine, Transformer


def prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """The prompt's token ids ([n]); with ``chat``, as the user's turn of the tokenizer's chat template."""
    if not chat:
        return torch.tensor(tokenizer(prompt)["input_ids"], dtype=torch.long)
    if not getattr(tokenizer, "chat_template", None):
        raise LarosaError("this model's tokenizer has no chat template; leave out --chat")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    return torch.tensor(ids, dtype=torch.long).view(-1)


def stop_ids(model: nn.Module, tokenizer) -> set[int]:
    """The end-of-sequence tokens of the model's generation config and of its tokenizer."""
    found = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(found if isinstance(found, (list, tuple)) else [found])
    ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None}


class TextStream:
    """Decodes the new tokens as they come and hands on the text they add; text that ends inside a multi-byte
    character waits for the token that completes it."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return
        self.on_text(text[len(self.shown):])
        self.shown = text


def generate(model: nn.Module, tokenizer, prompt: str, *, max_new_tokens: int = 128, chat: bool = False,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, compile: bool | None = None,
             on_text: Callable[[str], None] | None = None) -> dict:
    """Continue ``prompt`` with ``model`` (a dense, folded or TEAL-sparsified Hugging Face model, on its device)
    in the decode engine: greedy at temperature 0, else sampled (``top_p``, ``seed``). ``compile`` (default: on
    CUDA) compiles the decode step; ``on_text`` receives the text as it is produced."""
    if max_new_tokens < 1:
        raise LarosaError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise LarosaError(f"temperature must be >= 0 and top-p in (0, 1], got {temperature} and {top_p}")
    ids = prompt_ids(tokenizer, prompt, chat)
    if ids.numel() == 0:
        raise LarosaError("the prompt is empty")
    max_seq = ids.numel() + max_new_tokens
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_seq > limit:
        raise LarosaError(f"the prompt ({ids.numel()} tokens) and {max_new_tokens} new tokens exceed the model's "
                          f"context of {limit}")
    device = model.get_input_embeddings().weight.device
    compile = device.type == "cuda" if compile is None else compile
    start = time.perf_counter()
    engine = Engine(Transformer.from_hf(model, max_seq=max_seq), compile=compile)
    setup = time.perf_counter() - start
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
    stream = TextStream(tokenizer, on_text or (lambda text: None))
    out = engine.generate(ids, max_new_tokens, temperature=temperature, top_p=top_p, generator=generator,
                          stop=stop_ids(model, tokenizer), on_token=stream,
                          check=lambda logits: check_finite(logits, "the model", model))
    new = out.tokens[ids.numel():].tolist()
    return {"text": tokenizer.decode(new, skip_special_tokens=True), "prompt_tokens": ids.numel(),
            "new_tokens": len(new), "tokens": new, "stopped": out.stopped, "tokens_per_s": out.tokens_per_s,
            "prefill_seconds": out.prefill_seconds, "setup_seconds": setup, "device": str(device),
            "dtype": str(model.get_input_embeddings().weight.dtype).removeprefix("torch."), "compile": compile,
            "cuda_graph": engine.graph is not None, "chat": chat, "temperature": temperature, "top_p": top_p,
            "seed": seed}
