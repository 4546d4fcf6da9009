"""Every supported family beyond Llama and Qwen2, on tiny random configs built here: what the issue of more families
asks of each (Mistral: a sliding window; Qwen3: per-head QK-norm; Phi-3: fused q|k|v and gate|up weights, a partial
rotary embedding, longrope)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import random_windows, tiny_config, tiny_model
from transformers import AutoModelForCausalLM, Phi3Config

import larosa
from larosa import LaRoSaConfig
from larosa.runtime import Engine, Transformer
from larosa.sparsity import sites

FAMILIES = ["mistral", "qwen3", "phi3"]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(params=FAMILIES)
def family(request):
    model = tiny_model(request.param)
    return model, larosa.calibrate(model, random_windows(4, seed=3), signal="gainfree", progress=False)


def test_sparsity_zero_is_the_dense_model_simulated_and_in_every_folded_form(family):
    model, rot = family
    windows = random_windows(2)
    with torch.no_grad():
        dense = model(windows).logits
        for scope in ("block", "layer", "global"):
            simulated = larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(rot, sparsity=0.0, scope=scope))
            assert _rel(simulated(windows).logits, dense) < 1e-5
            for form in ("residual", "input"):
                folded = larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(
                    rot, sparsity=0.0, scope=scope, mode="folded", form=form, head_rotation=True))
                assert _rel(folded(windows).logits, dense) < 1e-4, (scope, form)


@pytest.mark.parametrize("scope", ["global", "block"])
def test_folded_equals_simulate_and_loads_bit_exact(family, scope, tmp_path):
    model, rot = family
    windows = random_windows(2)
    simulated = larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(rot, sparsity=0.5, scope=scope))
    folded = larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(rot, sparsity=0.5, scope=scope, mode="folded"))
    loaded = AutoModelForCausalLM.from_pretrained(larosa.save_folded(folded, None, tmp_path / "f"))
    with torch.no_grad():
        a, b, dense = folded(windows).logits, simulated(windows).logits, model(windows).logits
        assert _rel(a, b) < 1e-4 and _rel(b, dense) > 1e-2
        assert torch.equal(loaded(windows).logits, a)
    a, b = folded.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _assert_the_engine_generates_what_transformers_generates(hf, max_seq: int = 32, new_tokens: int = 12):
    prompt = random_windows(1, seq_len=6)[0]
    got = Engine(Transformer.from_hf(hf, max_seq=max_seq)).generate(prompt, new_tokens)
    ref = hf.generate(prompt[None], max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[0]
    assert torch.equal(got.tokens, ref)


def test_the_engine_generates_what_transformers_generates(family):
    model, rot = family
    for hf in (model, larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(rot, sparsity=0.4, mode="folded"))):
        _assert_the_engine_generates_what_transformers_generates(hf)


def test_the_engine_refuses_a_cache_longer_than_mistrals_window():
    model = tiny_model("mistral")  # sliding_window 128
    Transformer.from_hf(model, max_seq=128)
    with pytest.raises(larosa.LarosaError, match="windows its attention to 128 positions"):
        Transformer.from_hf(model, max_seq=129)


def test_phi3_longrope_decodes_as_transformers_within_the_original_context_and_is_refused_past_it():
    config = tiny_config("phi3")
    rope = {**config.rope_parameters, "rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0],
            "long_factor": [2.0, 4.0, 8.0, 16.0]}  # 4 factors: 8 rotated dims a head
    config = Phi3Config(**{**config.to_dict(), "rope_parameters": rope, "original_max_position_embeddings": 32})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _assert_the_engine_generates_what_transformers_generates(model, max_seq=32, new_tokens=20)
    with pytest.raises(larosa.LarosaError, match="longrope: .* at most 32 positions"):
        Transformer.from_hf(model, max_seq=33)


def test_phi3_keeps_its_fused_weights_folded_and_the_peers_sit_on_them(tmp_path):
    model = tiny_model("phi3")
    rot = larosa.calibrate(model, random_windows(4, seed=3), signal="gainfree", progress=False)
    folded = larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(rot, sparsity=0.5, mode="folded", head_rotation=True))
    loaded = AutoModelForCausalLM.from_pretrained(larosa.save_folded(folded, None, tmp_path / "f"))
    assert type(loaded).__name__ == "LarosaPhi3ForCausalLM" and set(model.state_dict()) <= set(loaded.state_dict())
    calib = random_windows(4, seed=5)
    larosa.sparsify(model, larosa.TealConfig(0.4, calib), progress=False)
    assert set(sites.of(model.model.layers[0])) == {"q+k+v", "o", "gate+up", "down"}
    larosa.sparsify(model, larosa.CatsConfig(0.3, calib), progress=False)
    fused, seen = model.model.layers[0].mlp.gate_up_proj, {}
    fused.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))  # after the CATS site's hook
    with torch.no_grad():
        model(calib[:1])
        gate, up = F.linear(seen["x"], fused.weight).chunk(2, dim=-1)
    gate = gate.masked_fill(F.silu(gate).abs() < sites.of(model.model.layers[0])["cats"].threshold, 0)
    assert (gate == 0).any() and torch.equal(seen["out"], torch.cat([gate, up], dim=-1))  # the up half untouched


def test_the_peers_and_the_search_run_on_the_family(family):
    model, rot = family
    calib = random_windows(4, seed=5)
    for config, target in ((larosa.TealConfig(0.4, calib, greedy=True, step=0.1), 0.4),
                           (larosa.CatsConfig(0.3, calib), 0.3)):
        larosa.sparsify(model, config, progress=False)
        assert larosa.perplexity(model, calib, progress=False)["measured_param_weighted"] == pytest.approx(
            target, abs=0.03)
        larosa.unsparsify(model)
    from larosa.search import search

    plan = search(copy.deepcopy(model), rot, random_windows(2, seed=7), 0.4, held_out=random_windows(2, seed=8),
                  progress=False)
    assert len(plan.levels) == 3 and plan.chosen in ("default", "split", "per-layer")


@pytest.mark.parametrize("arch", FAMILIES)
def test_calibration_from_disk_equals_calibration_in_ram(arch, tmp_path):
    from conftest import saved_tiny

    path = saved_tiny(tmp_path / "m", arch)
    eager, _ = larosa.load_model(path, device="cpu", dtype=torch.float32)
    lazy, _ = larosa.load_lazy(path)
    windows = random_windows(3)
    a, b = (larosa.calibrate(m, windows, device="cpu", progress=False) for m in (eager, lazy))
    for name in a.tensors:
        torch.testing.assert_close(b.tensors[name], a.tensors[name], rtol=1e-5, atol=1e-6)
