"""transformers' ``generate`` on a folded (or saved TEAL) model, through the engine: after ``import larosa``, greedy
and sampled generation at batch 1 on CUDA run the decode engine (CUDA graph, the Top-K kernels) in place of the
hooked Hugging Face modules and their dense matmuls, with transformers' own logits processors, stopping criteria
and streamer around it."""

from __future__ import annotations

import torch
from torch import nn

from ..arch import adapter_for
from ..fold.hf import FoldedCausalLM
from .engine import Engine, Proj, Transformer

ENGINE = "_larosa_engine"  # the engine a model keeps between generate calls
CACHE_STEP = 256  # the engine's cache is sized in steps of this many positions: one compile serves many lengths
DEVICES = ("cuda",)  # where the engine takes over (elsewhere the hooked model is as fast)


def engine_for(model: nn.Module, max_length: int) -> Engine:
    """The model's engine, (re)built when the asked length outgrows its cache, or the model moved or changed its
    selection."""
    weight = model.get_input_embeddings().weight
    key = (weight.device, weight.dtype, model.config.larosa.get("select"), str(model.config.larosa.get("thresholds")))
    built = model.__dict__.get(ENGINE)
    if built is None or built[0] != key or built[1].model.max_seq < max_length:
        model.__dict__.pop(ENGINE, None)
        max_seq = -(-max_length // CACHE_STEP) * CACHE_STEP
        limit = getattr(model.config, "max_position_embeddings", None)
        transformer = Transformer.from_hf(model, max_seq=min(max_seq, limit or max_seq))
        share_weights(model, transformer)
        built = model.__dict__[ENGINE] = key, Engine(transformer, compile=weight.device.type == "cuda")
    return built[1]


def share_weights(model: nn.Module, transformer: Transformer) -> None:
    """Point the model's projections at the engine's weights, so that the model and its engine keep one copy of
    them, not two (a 7B model would otherwise hold 27 GB in bf16). The engine joins q, k, v (and gate, up) into one
    matrix and keeps a sparse one input-major for its kernels: the model sees row slices of it, transposed where
    input-major, which its matmuls read as they are. Weights the engine rescaled (weight-aware scores) stay apart."""
    adapter = adapter_for(model)
    for layer, mine in zip(adapter.layers(), transformer.layers):
        for linears, proj in ((adapter.qkv(layer), mine.qkv), ((adapter.o_proj(layer),), mine.o),
                              (adapter.gate_up(layer), mine.gate_up), ((adapter.down_proj(layer),), mine.down)):
            _share(linears, proj)


def _share(linears, proj: Proj) -> None:
    if proj.scale is not None:
        return
    weight, start = proj.weight.T if proj.input_major else proj.weight, 0  # [d_out, d_in]
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = nn.Parameter(weight[start:start + rows], requires_grad=False)
        start += rows


@torch.no_grad()
def decode(model: nn.Module, input_ids: torch.Tensor, logits_processor, stopping_criteria, generation_config,
           synced_gpus: bool = False, streamer=None, **model_kwargs) -> torch.Tensor | None:
    """transformers' sampling loop (greedy when ``do_sample`` is off) with the engine as the model; None where it
    does not apply (not CUDA, a batch, outputs other than the tokens, a padded prompt)."""
    mask = model_kwargs.get("attention_mask")
    if (input_ids.shape[0] != 1 or input_ids.device.type not in DEVICES or synced_gpus
            or generation_config.return_dict_in_generate or (mask is not None and not bool(mask.all()))
            or input_ids.shape[1] >= generation_config.max_length):
        return None
    engine = engine_for(model, generation_config.max_length)
    prompt = input_ids.shape[1]
    if prompt + 1 > engine.model.max_seq:
        return None
    logits = engine.model(input_ids[0], torch.arange(prompt, device=input_ids.device))[-1:]
    for pos in range(prompt, min(generation_config.max_length, engine.model.max_seq)):
        scores = logits_processor(input_ids, logits.float())
        token = torch.multinomial(torch.softmax(scores, -1), 1)[0] if generation_config.do_sample else scores.argmax(-1)
        input_ids = torch.cat([input_ids, token[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(token.cpu())
        if bool(stopping_criteria(input_ids, scores).all()):
            break
        logits = engine.step(token, pos)
    if streamer is not None:
        streamer.end()
    return input_ids


FoldedCausalLM.decoder = decode
