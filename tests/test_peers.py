import copy
import json

import pytest
import torch
from conftest import generates_as_hf, random_windows, relative_error, tiny_model
from transformers import AutoModelForCausalLM
from transformers.activations import ACT2FN

import larosa
from larosa.arch import adapter_for
from larosa.errors import LarosaError
from larosa.fold import rotated, weight_scaled
from larosa.sparsity import peers
from larosa.sparsity.levels import site_weights
from larosa.sparsity.topk import weight_norms
from larosa.sparsity.peers import PROJECTIONS, CatsConfig, TealConfig, cats, cats_level, restore, teal
from larosa.sparsity.sites import measured_param_weighted, site_sparsity

METHODS = ["teal", "teal-greedy", "cats"]
TARGETS = {"teal": 0.4, "teal-greedy": 0.4, "cats": 0.3}  # the tiny models' up + down share is 40 %


def calibrate(method: str, model, windows, target: float | None = None) -> dict:
    target = TARGETS[method] if target is None else target
    if method == "cats":
        return cats(model, CatsConfig(target, windows), progress=False)
    return teal(model, TealConfig(target, windows, greedy=method == "teal-greedy", step=0.1), progress=False)


def layer_weights(model) -> int:
    return sum(site_weights(adapter_for(model).dims).values())


def hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def capture(model, windows, replace: dict | None = None) -> tuple[dict, dict]:
    """Each layer's input and output on ``windows``; with ``replace``, each layer is fed that input instead
    (the dense model's), so the outputs measure every layer's own error, as the greedy search does."""
    ins, outs, handles = {}, {}, []
    for i, layer in enumerate(adapter_for(model).layers()):
        if replace is None:
            handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: ins.__setitem__(i, a[0])))
        else:
            handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: (replace[i], *a[1:])))
        handles.append(layer.register_forward_hook(
            lambda m, a, out, i=i: outs.__setitem__(i, out[0] if isinstance(out, tuple) else out)))
    with torch.no_grad():
        model(windows)
    for h in handles:
        h.remove()
    return ins, outs


def test_uniform_teal_at_zero_is_dense(model):
    windows = random_windows(2)
    with torch.no_grad():
        dense = model(windows).logits
        settings = teal(model, TealConfig(0.0, random_windows(3, seed=5)), progress=False)
        sparse = model(windows).logits
    assert torch.equal(sparse, dense)
    assert all(plan[p]["threshold"] == 0.0 for plan in settings["layers"] for p in PROJECTIONS)
    assert hook_count(model) == len(PROJECTIONS) * len(settings["layers"])  # the sites really ran
    assert measured_param_weighted(model) < 0.01


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method", METHODS)
def test_measured_param_weighted_sparsity_matches_target(arch, method):
    model, windows = tiny_model(arch), random_windows(4, seed=3)
    settings = calibrate(method, model, windows)
    assert settings["method"] == method
    assert json.loads(json.dumps(settings)) == settings
    result = larosa.perplexity(model, windows, progress=False)
    assert result["measured_param_weighted"] == pytest.approx(TARGETS[method], abs=0.02)
    # Every weight is counted once: TEAL's sites gate all linear weights, CATS' only up_proj and down_proj.
    dims = adapter_for(model).dims
    gated = {"cats": 2 * dims.hidden * dims.intermediate}.get(method, layer_weights(model))
    for layer in adapter_for(model).layers():
        assert sum(site.weights for site in layer.larosa_sites.values()) == gated


def test_quantiles_from_a_token_subsample(monkeypatch):
    """With fewer sampled values than the calibration holds, thresholds are still the target's quantiles."""
    monkeypatch.setattr(larosa.streaming, "SAMPLE", 2000)
    model, windows = tiny_model("llama"), random_windows(8, seed=3)
    teal(model, TealConfig(0.5, windows), progress=False)
    assert larosa.perplexity(model, windows, progress=False)["measured_param_weighted"] == pytest.approx(0.5, abs=0.04)


@pytest.mark.parametrize("centre", ["mean", "median"])
def test_centred_teal_thresholds_the_distance_from_each_coordinates_offset(centre):
    """Centred TEAL: at target 0 the model is dense (the offset goes out and comes back); at 0.5 each site's
    offset is its input's per-coordinate mean or median on the calibration tokens, the measured sparsity holds,
    and what a site passes on is x where |x - offset| >= threshold and the offset elsewhere."""
    model, windows = tiny_model("llama"), random_windows(4, seed=3)
    with torch.no_grad():
        dense = model(windows).logits
        teal(model, TealConfig(0.0, windows, centre=centre), progress=False)
        assert relative_error(model(windows).logits, dense) < 1e-6
    settings = teal(model, TealConfig(0.5, windows, centre=centre), progress=False)
    assert settings["centre"] == centre and json.loads(json.dumps(settings)) == settings
    assert larosa.perplexity(model, windows, progress=False)["measured_param_weighted"] == pytest.approx(0.5, abs=0.03)
    ins, _ = capture(tiny_model("llama"), windows)
    layer = adapter_for(model).layers()[0]
    x = layer.input_layernorm(ins[0]).reshape(-1, 64)  # what q, k and v read
    want = x.mean(0) if centre == "mean" else x.median(0).values
    site = layer.larosa_sites["q"]
    assert site.offset.shape == (64,) and relative_error(site.offset, want) < 0.05  # a subsample of the tokens
    probe = x[:5]
    kept = (probe - site.offset).abs() >= site.threshold
    with torch.no_grad():  # (x - offset) + offset: x to rounding
        assert torch.allclose(site(probe), torch.where(kept, probe, site.offset.expand_as(probe)), atol=1e-6)
    assert 0.2 < kept.float().mean() < 0.8
    with pytest.raises(LarosaError, match="centre must be"):
        TealConfig(0.5, windows, centre="mode")
    with pytest.raises(LarosaError, match="need their offsets"):
        peers.restore(tiny_model("llama"), settings)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3", "phi3"])
def test_the_rotated_model_is_a_plain_model_of_the_family_with_the_same_logits(arch):
    model, windows = tiny_model(arch), random_windows(4, seed=3)
    rot = larosa.calibrate(model, windows, signal="gainfree", progress=False)
    with torch.no_grad():
        dense = model(windows).logits
        plain = rotated(copy.deepcopy(model), rot)
        assert type(plain) is type(model) and relative_error(plain(windows).logits, dense) < 1e-4
    assert relative_error(plain.get_input_embeddings().weight, model.get_input_embeddings().weight) > 0.1
    folded_gains = {k for k, v in plain.state_dict().items() if k.endswith("norm.weight") and torch.all(v == 1)}
    assert folded_gains and all("q_norm" not in k and "k_norm" not in k for k in folded_gains)  # Qwen3's stay


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3", "phi3"])
def test_weight_scaling_keeps_the_logits_and_leaves_every_input_column_of_unit_norm(arch):
    """After it, |x_i| is WINA's |x_i| ||W_:,i|| of the model before: the block inputs' and the down_proj input's
    columns have norm 1, o_proj's an RMS of 1 over the query heads that share a KV head (Qwen2's GQA: 4 of them)."""
    model, windows = tiny_model(arch), random_windows(4, seed=3)
    with torch.no_grad():
        dense = model(windows).logits
        scaled = weight_scaled(copy.deepcopy(model))
        assert relative_error(scaled(windows).logits, dense) < 1e-5
    adapter = adapter_for(scaled)
    d = adapter.dims
    before = weight_norms(adapter_for(model), adapter_for(model).layers()[0])
    for layer in adapter.layers():
        norms = weight_norms(adapter, layer)
        for name in ("attn_in", "mlp_in", "down_in"):
            torch.testing.assert_close(norms[name], torch.ones_like(norms[name]))
        o = norms["o_in"].view(d.n_kv_heads, -1, d.head_dim).square().mean(1)
        torch.testing.assert_close(o, torch.ones_like(o))
    assert relative_error(before["attn_in"], torch.ones_like(before["attn_in"])) > 0.1  # it had something to do


def test_weight_aware_teal_thresholds_the_weighted_score_and_saves_as_a_plain_model(tmp_path):
    """TealConfig(score="weight"): the rescaled model (same logits), TEAL's thresholds on it; the target holds, the
    engine decodes it as transformers, and it saves and loads as any TEAL model (same logits)."""
    model, windows = tiny_model("qwen2"), random_windows(4, seed=3)
    sparse = larosa.sparsify(copy.deepcopy(model), TealConfig(0.5, windows, greedy=True, score="weight", step=0.1),
                             progress=False)
    described = larosa.describe(sparse)
    assert described["score"] == "weight" and "weight-aware" in described["label"]
    assert larosa.perplexity(sparse, windows, progress=False)["measured_param_weighted"] == pytest.approx(0.5, abs=0.03)
    plain = larosa.sparsify(copy.deepcopy(model), TealConfig(0.5, windows, greedy=True, step=0.1), progress=False)
    with torch.no_grad():  # a different choice of entries from magnitude TEAL's
        assert relative_error(sparse(windows).logits, plain(windows).logits) > 1e-3
    generates_as_hf(sparse)
    loaded = AutoModelForCausalLM.from_pretrained(larosa.save_folded(sparse, None, tmp_path / "wa"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(windows).logits, sparse(windows).logits)
    with pytest.raises(LarosaError, match="score must be one of"):
        TealConfig(0.5, windows, score="gain")


def test_larosa_greedy_selection_is_centred_weight_aware_teal_greedy_on_the_rotated_model():
    """LaRoSaConfig(select="greedy") (sparsify's default form): exactly TealConfig with the rotations, greedy,
    centred on the median and weight-aware; what it cannot take is refused."""
    model, windows = tiny_model("llama"), random_windows(4, seed=3)
    rot = larosa.calibrate(model, windows, signal="gainfree", progress=False)
    larosa_greedy = larosa.sparsify(copy.deepcopy(model), larosa.LaRoSaConfig(rot, target=0.4, select="greedy",
                                                                               calib=windows), progress=False)
    teal_config = TealConfig(0.4, windows, greedy=True, centre="median", score="weight", rotations=rot)
    teal_greedy = larosa.sparsify(copy.deepcopy(model), teal_config, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(larosa_greedy(windows).logits, teal_greedy(windows).logits)
    assert larosa.describe(larosa_greedy) == larosa.describe(teal_greedy)
    refused = {"global scope only": {"scope": "block"}, "residual form only": {"form": "input", "mode": "folded"},
               "parameter-weighted target": {"target": None, "sparsity": 0.4},
               "give rotations": {"rotations": None}, "calibration windows": {"calib": None}}
    for message, change in refused.items():
        with pytest.raises(LarosaError, match=message):
            larosa.LaRoSaConfig(**{"rotations": rot, "target": 0.4, "select": "greedy", "calib": windows, **change})


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_teal_on_the_globally_rotated_model(arch):
    """TealConfig(rotations=...): the model turned into the basis of one global Q (a plain model of its family, the
    same logits, other weights), then TEAL's thresholds on it, centred; the engine decodes it as transformers
    does. Gemma 3, whose residual stream cannot be rotated, is refused."""
    model, windows = tiny_model(arch), random_windows(4, seed=3)
    rot = larosa.calibrate(model, windows, signal="gainfree", progress=False)
    sparse = larosa.sparsify(copy.deepcopy(model), TealConfig(0.5, windows, greedy=True, centre="median",
                                                              rotations=rot), progress=False)
    assert type(sparse) is type(model) and sparse.larosa["rotated"] == "global"
    described = larosa.describe(sparse)
    assert (described["scope"], described["centre"]) == ("global", "median") and "rotation" in described["label"]
    assert larosa.perplexity(sparse, windows, progress=False)["measured_param_weighted"] == pytest.approx(0.5, abs=0.03)
    generates_as_hf(sparse)
    gemma = tiny_model("gemma3")
    with pytest.raises(LarosaError, match="without rotations"):
        rotated(gemma, larosa.calibrate(gemma, windows, signal="gainfree", progress=False))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_holds_target_per_layer_with_less_layer_error_than_uniform(arch):
    model, windows = tiny_model(arch), random_windows(4, seed=3)
    dense_in, dense_out = capture(model, windows)

    def errors() -> list[float]:
        _, out = capture(model, windows, replace=dense_in)
        return [((out[i] - dense_out[i]).pow(2).sum() / dense_out[i].pow(2).sum()).item() for i in out]

    teal(model, TealConfig(0.4, windows), progress=False)
    uniform = errors()
    settings = teal(model, TealConfig(0.4, windows, greedy=True, step=0.1), progress=False)
    site_sparsity(model, reset=True)
    greedy = errors()
    weights = {p: m.weight.numel() for p, m in peers._projections(adapter_for(model), model.model.layers[0]).items()}
    for layer, plan, g, u in zip(adapter_for(model).layers(), settings["layers"], greedy, uniform):
        configured = sum(plan[p]["sparsity"] * weights[p] for p in PROJECTIONS) / layer_weights(model)
        assert configured == pytest.approx(0.4, abs=1e-9)
        measured = sum(s.zeros.item() / s.seen.item() * s.weights for s in layer.larosa_sites.values())
        assert measured / layer_weights(model) == pytest.approx(0.4, abs=0.01)  # on the inputs it was tuned on
        sparsities = [plan[p]["sparsity"] for p in PROJECTIONS]
        assert max(sparsities) - min(sparsities) > 0.1  # an allocation, not uniform again
        assert g < u


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cats_zeroes_down_proj_inputs_where_the_gate_activation_is_small(arch):
    model, windows = tiny_model(arch), random_windows(4, seed=3)
    adapter = adapter_for(model)
    settings = cats(model, CatsConfig(0.3, windows), progress=False)
    level = cats_level(adapter.dims, 0.3)
    assert level * 2 * adapter.dims.hidden * adapter.dims.intermediate == pytest.approx(0.3 * layer_weights(model))
    act = ACT2FN[model.config.hidden_act]
    seen = {}
    for i, layer in enumerate(adapter.layers()):
        assert set(layer.larosa_sites) == {"cats"}
        untouched = [*adapter.qkv(layer), adapter.o_proj(layer), adapter.gate_up(layer)[1], adapter.down_proj(layer)]
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in untouched)
        adapter.gate_up(layer)[1].register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__((i, "x"), a[0]))
        adapter.down_proj(layer).register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__((i, "down"), a[0]))
    with torch.no_grad():
        model(windows)
        for i, (layer, plan) in enumerate(zip(adapter.layers(), settings["layers"])):
            small = act(adapter.gate_up(layer)[0](seen[i, "x"])).abs() < plan["cats"]["threshold"]
            assert torch.equal(seen[i, "down"] == 0, small)
            assert small.float().mean().item() == pytest.approx(level, abs=0.03)


def test_restore_reproduces_and_unsparsify_restores_dense_exactly():
    model, windows = tiny_model("llama"), random_windows(3, seed=3)
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        dense = model(windows).logits
        for method in METHODS:  # each call replaces the one before
            settings = calibrate(method, model, windows)
            sparse = model(windows).logits
            assert not torch.allclose(sparse, dense)
            assert measured_param_weighted(model) == pytest.approx(TARGETS[method], abs=0.02)  # calibrated dense
            assert hook_count(model) == (1 if method == "cats" else len(PROJECTIONS)) * len(settings["layers"])
            restore(fresh, json.loads(json.dumps(settings)))
            assert torch.equal(fresh(windows).logits, sparse)
        larosa.unsparsify(model)
        assert torch.equal(model(windows).logits, dense)
    assert hook_count(model) == 0
    assert all("larosa_sites" not in layer._modules for layer in adapter_for(model).layers())


@pytest.mark.parametrize("target", [-0.1, 1.0, 1.5, True, "0.4", None])
def test_bad_targets_are_refused(target):
    model, windows = tiny_model("llama"), random_windows(2)
    with pytest.raises(LarosaError, match="target"):
        teal(model, TealConfig(target, windows), progress=False)
    with pytest.raises(LarosaError, match="target"):
        cats(model, CatsConfig(target, windows), progress=False)
    assert hook_count(model) == 0


def test_unreachable_targets_are_refused():
    model, windows = tiny_model("llama"), random_windows(2)
    dims = adapter_for(model).dims
    assert cats_level(dims, 0.39) == pytest.approx(0.39 / 0.4)  # up + down are 40 % of the tiny layer
    with pytest.raises(LarosaError, match="out of reach"):
        cats(model, CatsConfig(0.4, windows), progress=False)
    with pytest.raises(LarosaError, match="too high"):
        teal(model, TealConfig(0.995, windows, greedy=True), progress=False)
    with pytest.raises(LarosaError, match="step"):
        teal(model, TealConfig(0.4, windows, greedy=True, step=0.0), progress=False)


def test_bad_settings_and_folded_models_are_refused():
    model, windows = tiny_model("llama"), random_windows(2)
    settings = teal(model, TealConfig(0.3, windows), progress=False)
    with pytest.raises(LarosaError, match="method"):
        restore(model, {**settings, "method": "topk"})
    with pytest.raises(LarosaError, match="layers"):
        restore(model, {**settings, "layers": settings["layers"][:-1]})
    larosa.unsparsify(model)
    rotations = larosa.calibrate(model, windows, signal="gainfree", device="cpu", progress=False)
    folded = larosa.sparsify(copy.deepcopy(model), larosa.LaRoSaConfig(rotations, sparsity=0.0, mode="folded"))
    for call in (lambda: teal(folded, TealConfig(0.3, windows), progress=False),
                 lambda: cats(folded, CatsConfig(0.3, windows), progress=False), lambda: restore(folded, settings)):
        with pytest.raises(LarosaError, match="folded"):
            call()
