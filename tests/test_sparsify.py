import math

import pytest
import torch
from conftest import random_windows, tiny_model

import larosa
from larosa import LaRoSaConfig
from larosa.arch import adapter_for
from larosa.sparsity.levels import SITES, SparsityConfig, keep_count, site_sizes
from larosa.sparsity.topk import topk


def test_topk_keeps_exactly_k_largest_even_with_ties():
    x = torch.tensor([[3.0, -3.0, 3.0, 1.0, -3.0, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    for k in range(1, 6):
        y = topk(x, k)
        assert torch.equal((y != 0).sum(-1), torch.full((2,), k))
        assert torch.all((y == 0) | (y == x))  # kept entries are unchanged
        # nothing dropped is larger in magnitude than anything kept
        for row_x, row_y in zip(x, y):
            assert row_x[row_y == 0].abs().max() <= row_y[row_y != 0].abs().min()
    x = torch.randint(-3, 4, (50, 40)).float()
    x[x == 0] = 1.0
    assert torch.equal((topk(x, 17) != 0).sum(-1), torch.full((50,), 17))


def test_keep_count_rounds():
    assert keep_count(0.4, 576) == 346  # 345.6
    assert keep_count(0.0, 576) == 576
    assert keep_count(0.5, 11008) == 5504
    assert keep_count(0.999, 10) == 1


@pytest.mark.parametrize("scope", ["block", "layer", "global"])
@pytest.mark.parametrize("signal", ["gain", "gainfree"])
def test_sparsity_zero_reproduces_dense_logits(model, scope, signal):
    windows = random_windows(2)
    with torch.no_grad():
        dense = model(windows).logits
        rot = larosa.calibrate(model, windows, signal=signal, device="cpu", progress=False)
        larosa.sparsify(model, LaRoSaConfig(rot, sparsity=0.0, scope=scope))
        sparse = model(windows).logits
    assert (sparse - dense).abs().max() / dense.abs().max() < 1e-5
    assert not torch.equal(sparse, dense)  # the rotations really ran (in fp32 they round differently)


def test_unsparsify_restores_dense_exactly():
    model, windows = tiny_model("llama"), random_windows(2)
    with torch.no_grad():
        dense = model(windows).logits
        rot = larosa.calibrate(model, windows, device="cpu", progress=False)
        larosa.sparsify(model, LaRoSaConfig(rot, sparsity=0.5))
        assert not torch.allclose(model(windows).logits, dense)
        larosa.unsparsify(model)
        assert torch.equal(model(windows).logits, dense)
    assert "larosa_sites" not in dict(model.named_modules()).get("model.layers.0")._modules


def test_each_site_keeps_k_per_token_and_measures_what_was_configured(model):
    windows = random_windows(2, seq_len=24)
    rot = larosa.calibrate(model, random_windows(4, seed=7), device="cpu", progress=False)  # 128 tokens: full rank
    config = SparsityConfig(attn_in=0.3, o_in=0.55, mlp_in=0.2, down_in=0.7)
    larosa.sparsify(model, LaRoSaConfig(rot, sparsity=config))
    adapter = adapter_for(model)
    sizes = site_sizes(adapter.dims)
    # Every token at every site: exactly k non-zeros in the (rotated) basis the weights see.
    seen = {s: [] for s in SITES}
    for layer in adapter.layers():
        for name, site in layer.larosa_sites.items():
            site.register_forward_hook(lambda m, a, out, name=name: seen[name].append(
                out @ m.rotation if m.rotation is not None else out))
    with torch.no_grad():
        model(windows)
    for name in SITES:
        k = keep_count(getattr(config, name), sizes[name])
        for v in seen[name]:
            kept = (v.abs() > 1e-5 * v.abs().amax(-1, keepdim=True)).sum(-1)
            assert torch.equal(kept, torch.full_like(kept, k)), name
    larosa.site_sparsity(model, reset=True)
    with torch.no_grad():
        model(windows)
    measured = larosa.site_sparsity(model)
    for name in SITES:
        s = getattr(config, name)
        assert measured[name] == pytest.approx(1 - keep_count(s, sizes[name]) / sizes[name], abs=1e-9)
        assert abs(measured[name] - s) <= 0.5 / sizes[name] + 1e-12


def test_default_split_and_parameter_weighted_sparsity():
    cfg = SparsityConfig.from_nominal(0.4)
    assert cfg.sites() == pytest.approx({"attn_in": 0.32, "o_in": 0.48, "mlp_in": 0.32, "down_in": 0.48})
    dims = adapter_for(tiny_model("llama")).dims  # d=64, I=96, 4 heads, 2 kv heads of 16
    w = {"attn_in": 64 * (64 + 2 * 32), "o_in": 64 * 64, "mlp_in": 2 * 64 * 96, "down_in": 96 * 64}
    expected = sum(cfg.sites()[s] * w[s] for s in SITES) / sum(w.values())
    assert cfg.param_weighted(dims) == pytest.approx(expected)
    assert SparsityConfig(0.5, 0.5, 0.5, 0.5).param_weighted(dims) == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, math.nan, "0.4"])
def test_sparsity_outside_unit_interval_is_refused(bad):
    with pytest.raises(larosa.LarosaError, match=r"must be in \[0, 1\)"):
        SparsityConfig.from_nominal(bad)
    with pytest.raises(larosa.LarosaError, match=r"must be in \[0, 1\)"):
        SparsityConfig(0.1, bad, 0.1, 0.1)


def test_split_that_overflows_a_site_is_refused():
    with pytest.raises(larosa.LarosaError, match="must be < 1"):
        SparsityConfig.from_nominal(0.9)  # 1.2 x 0.9 at o_proj / down_proj inputs


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import AutoModelForCausalLM, GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(larosa.LarosaError, match="unsupported architecture 'gpt2'.*llama, mistral, phi3, qwen2, qwen3"):
        larosa.sparsify(gpt2, LaRoSaConfig(sparsity=0.4))
    with pytest.raises(larosa.LarosaError, match="unsupported architecture"):
        larosa.calibrate(gpt2, random_windows(), progress=False)


def test_unknown_scope_is_refused():
    model = tiny_model("llama")
    rot = larosa.calibrate(model, random_windows(), progress=False)
    with pytest.raises(larosa.LarosaError, match="scope must be one of"):
        larosa.sparsify(model, LaRoSaConfig(rot, sparsity=0.4, scope="head"))


@pytest.mark.parametrize("sparsity", [0.0, 0.4])
def test_batched_perplexity_equals_one_window_at_a_time(sparsity):
    model = tiny_model("llama")
    windows = random_windows(5)
    if sparsity:
        rot = larosa.calibrate(model, random_windows(4, seed=3), progress=False)
        larosa.sparsify(model, LaRoSaConfig(rot, sparsity=sparsity))
    one = larosa.perplexity(model, windows, progress=False)
    for batch in (2, 5, 8):  # uneven last batch; more than there are windows
        got = larosa.perplexity(model, windows, batch_size=batch, progress=False)
        assert got["ppl"] == pytest.approx(one["ppl"], rel=1e-5) and got["tokens"] == one["tokens"] == 5 * 31
        assert got["site_sparsity"] == pytest.approx(one["site_sparsity"])
    with pytest.raises(larosa.LarosaError, match="batch size"):
        larosa.perplexity(model, windows, batch_size=0)


def test_threshold_selection_keeps_about_the_configured_share_of_the_calibration_entries():
    """Thresholds calibrated per layer and site in the basis each site ranks: on the calibration windows every
    site zeroes about its level (k varies per token), exactly 0 at level 0, and saved thresholds reproduce the
    model without recalibrating."""
    model, calib = tiny_model("llama"), random_windows(6, seed=4)
    rot = larosa.calibrate(model, random_windows(4, seed=7), device="cpu", progress=False)
    levels = SparsityConfig(attn_in=0.3, o_in=0.55, mlp_in=0.2, down_in=0.7)
    with torch.no_grad():
        dense = model(calib).logits
    larosa.sparsify(model, LaRoSaConfig(rot, sparsity=levels, select="threshold", calib=calib), progress=False)
    report = larosa.describe(model)
    assert report["select"] == "threshold" and "thresholds" in report["label"]
    thresholds = larosa.sparsity.sites.settings(model)["thresholds"]
    assert len(thresholds) == 3 and all(t[s] > 0 for t in thresholds for s in SITES)
    measured = larosa.perplexity(model, calib, progress=False)["site_sparsity"]
    for site, level in levels.sites().items():
        assert measured[site] == pytest.approx(level, abs=0.02), site
    with torch.no_grad():
        sparse = model(calib).logits
        again = larosa.sparsify(model, LaRoSaConfig(rot, sparsity=levels, select="threshold", thresholds=thresholds))
        assert torch.equal(again(calib).logits, sparse)
        larosa.sparsify(model, LaRoSaConfig(rot, sparsity=0.0, select="threshold", calib=calib), progress=False)
        assert larosa.sparsity.sites.settings(model)["thresholds"][0]["attn_in"] == 0.0
        assert (model(calib).logits - dense).abs().max() / dense.abs().max() < 1e-5


def test_threshold_selection_options_are_checked():
    rot = larosa.calibrate(tiny_model("llama"), random_windows(), progress=False)
    with pytest.raises(larosa.LarosaError, match="needs calibration windows"):
        LaRoSaConfig(rot, sparsity=0.4, select="threshold")
    with pytest.raises(larosa.LarosaError, match="are for threshold selection"):
        LaRoSaConfig(rot, sparsity=0.4, calib=random_windows())
    with pytest.raises(larosa.LarosaError, match="select must be one of"):
        LaRoSaConfig(rot, sparsity=0.4, select="random")
    with pytest.raises(larosa.LarosaError, match="1 layers of thresholds"):
        larosa.sparsify(tiny_model("llama"), LaRoSaConfig(rot, sparsity=0.4, select="threshold",
                                                          thresholds=[dict.fromkeys(SITES, 0.1)]))


@pytest.mark.parametrize("centre", ["mean", "median"])
def test_centring_selects_around_a_calibrated_offset(centre):
    """Every site subtracts a per-coordinate offset (the mean or median of its rotated input on the calibration
    windows) before it selects and adds it back after: dense at sparsity 0 up to rounding, exactly k entries of the
    centred input kept a token, and (with thresholds) about the configured share dropped."""
    model, calib, windows = tiny_model("qwen2"), random_windows(6, seed=4), random_windows(2)
    rot = larosa.calibrate(model, random_windows(4, seed=7), signal="gainfree", device="cpu", progress=False)
    with torch.no_grad():
        dense = model(windows).logits
        larosa.sparsify(model, LaRoSaConfig(rot, sparsity=0.0, centre=centre, calib=calib), progress=False)
        assert (model(windows).logits - dense).abs().max() / dense.abs().max() < 1e-5
    offsets = [site.offset for layer in adapter_for(model).layers() for site in layer.larosa_sites.values()]
    assert len(offsets) == 12 and all(o is not None and float(o.abs().max()) > 0 for o in offsets)
    larosa.sparsify(model, LaRoSaConfig(rot, sparsity=0.5, centre=centre, calib=calib), progress=False)
    assert larosa.describe(model)["centre"] == centre
    measured = larosa.perplexity(model, windows, progress=False)["site_sparsity"]
    for site, level in SparsityConfig.from_nominal(0.5).sites().items():  # exact Top-K: k of the centred input
        assert measured[site] == pytest.approx(level, abs=0.02)
    larosa.sparsify(model, LaRoSaConfig(rot, sparsity=0.5, centre=centre, calib=calib, select="threshold"),
                    progress=False)
    measured = larosa.perplexity(model, calib, progress=False)["site_sparsity"]
    for site, level in SparsityConfig.from_nominal(0.5).sites().items():
        assert measured[site] == pytest.approx(level, abs=0.03)
    with pytest.raises(larosa.LarosaError, match="centring needs calibration windows"):
        LaRoSaConfig(rot, sparsity=0.5, centre=centre)
