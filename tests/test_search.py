"""Weight-aware scores, per-layer plans and the searches that make them."""

import copy
import json

import pytest
import torch
from conftest import random_windows, relative_error, saved_tiny, tiny_model
from transformers import AutoModelForCausalLM

import larosa
from larosa import LaRoSaConfig
from larosa.arch import adapter_for
from larosa.cli import main
from larosa.fold import save_folded
from larosa.search import MARGIN, greedy_plan, search
from larosa.sparsity.levels import SparsityConfig, config_for_target, default_config, greedy_levels, param_weighted
from larosa.sparsity.plan import load_plans, save_plans, select
from larosa.sparsity.topk import topk


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_model("llama")
    return model, larosa.calibrate(model, random_windows(4, seed=3), signal="gainfree", progress=False)


def test_weight_aware_top_k_keeps_the_largest_weighted_entries():
    x = torch.tensor([[4.0, -3.0, 2.0, 1.0]])
    scale = torch.tensor([0.1, 1.0, 1.0, 10.0])
    assert topk(x, 2).tolist() == [[4.0, -3.0, 0.0, 0.0]]
    assert topk(x, 2, scale).tolist() == [[0.0, -3.0, 0.0, 1.0]]  # scores 0.4, 3, 2, 10


@pytest.mark.parametrize("scope", ["global", "block"])
def test_folded_equals_simulate_with_weight_aware_scores(calibrated, scope):
    model, rot = calibrated
    windows = random_windows(2)
    simulated = larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(rot, sparsity=0.5, scope=scope, score="weight"))
    magnitude = larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(rot, sparsity=0.5, scope=scope))
    folded = larosa.sparsify(copy.deepcopy(model),
                             LaRoSaConfig(rot, sparsity=0.5, scope=scope, score="weight", mode="folded"))
    with torch.no_grad():
        a, b, c = folded(windows).logits, simulated(windows).logits, magnitude(windows).logits
    assert relative_error(a, b) < 1e-4
    assert relative_error(b, c) > 1e-3  # the score really changes the kept set


def test_per_layer_plan_sets_each_layers_k_and_survives_save_and_load(calibrated, tmp_path):
    model, rot = calibrated
    dims = adapter_for(model).dims
    plan = [SparsityConfig(0.1, 0.2, 0.3, 0.4), SparsityConfig(0.5, 0.5, 0.5, 0.5), SparsityConfig(0.0, 0.0, 0.0, 0.0)]
    simulated = larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(rot, sparsity=plan))
    ks = [[s.k for s in layer.larosa_sites.values()] for layer in adapter_for(simulated).layers()]
    assert ks == [[58, 51, 45, 58], [32, 32, 32, 48], [64, 64, 64, 96]]  # d = 64 = heads x head_dim, intermediate 96
    assert param_weighted(plan, dims) == pytest.approx(sum(c.param_weighted(dims) for c in plan) / 3)
    folded = larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(rot, sparsity=plan, score="weight", mode="folded"))
    out = save_folded(folded, None, tmp_path / "f")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    windows = random_windows(2)
    with torch.no_grad():
        assert torch.equal(loaded(windows).logits, folded(windows).logits)
    assert loaded.config.larosa["sparsity_per_layer"][1]["attn_in"] == 0.5


def test_wrong_length_plan_is_refused(calibrated):
    model, rot = calibrated
    with pytest.raises(larosa.LarosaError, match="per-layer plan"):
        larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(rot, sparsity=[SparsityConfig(0.1, 0.1, 0.1, 0.1)]))


@pytest.mark.parametrize("multiple", [0.5, 0.8, 1.0, 1.2])
def test_configs_for_a_target_hold_the_parameter_weighted_sparsity(multiple):
    dims = adapter_for(tiny_model("llama")).dims
    config = config_for_target(dims, 0.4, multiple)
    assert config.param_weighted(dims) == pytest.approx(0.4)
    assert config.attn_in == pytest.approx(0.4 * multiple)
    assert default_config(dims, 0.4).param_weighted(dims) == pytest.approx(0.4)
    assert config_for_target(dims, 0.9, 0.5) is None  # plain sites would need more than 1


def test_greedy_levels_land_on_the_target_and_spare_the_costly_site():
    weights = {"cheap": 300, "costly": 100}
    calls = []

    def error(levels):
        calls.append(levels)
        return levels["cheap"] ** 2 + 50 * levels["costly"] ** 2

    levels = greedy_levels(weights, 0.4, 0.05, error)
    assert sum(levels[s] * w for s, w in weights.items()) / sum(weights.values()) == pytest.approx(0.4)
    assert levels["costly"] < 0.1 < levels["cheap"]
    assert calls[0] == {"cheap": 0.0, "costly": 0.0}  # the dense error is measured, not assumed 0
    with pytest.raises(larosa.LarosaError, match="cannot reach"):  # no site goes beyond MAX_SITE = 0.99
        greedy_levels(weights, 0.995, 0.25, error)


def test_per_layer_site_plan_holds_the_target_in_every_layer(calibrated):
    model, rot = calibrated
    dims = adapter_for(model).dims
    plan = greedy_plan(copy.deepcopy(model), rot, random_windows(2, seed=7), 0.4, scope="block", progress=False)
    assert len(plan) == dims.n_layers
    for config in plan:
        assert config.param_weighted(dims) == pytest.approx(0.4)
    levels = {round(v, 6) for c in plan for v in c.sites().values()}
    assert len(levels) > 2  # sites and layers get different levels, not one split


def test_search_holds_the_target_and_round_trips_through_a_plan_file(calibrated, tmp_path):
    model, rot = calibrated
    dims = adapter_for(model).dims
    windows = random_windows(2, seed=7)
    plan = search(copy.deepcopy(model), rot, windows, 0.4, scope="block", progress=False)
    configs = list(plan.levels)
    assert param_weighted(configs, dims) == pytest.approx(0.4)
    # the fixed split stays unless a candidate beats it by the margin (issue 14: a search that generalises)
    assert set(plan.nll) == {"default", "split", "per-layer"}
    best = min(plan.nll, key=plan.nll.get)
    assert plan.chosen == (best if plan.nll[best] < plan.nll["default"] - MARGIN else "default")
    if plan.chosen != "per-layer":
        assert all(c == configs[0] for c in configs)
    if plan.chosen == "split":
        assert min(t["nll"] for t in plan.split_trials) == pytest.approx(
            next(t["nll"] for t in plan.split_trials if t["rotated_multiple"] == plan.rotated_multiple))
    else:
        assert plan.rotated_multiple == pytest.approx(default_config(dims, 0.4).attn_in / 0.4)
    assert plan.model["config_hash"] == rot.meta["config_hash"] and plan.signal == "gainfree"
    save_plans([plan], tmp_path / "plans.json")
    again = load_plans(tmp_path / "plans.json")
    assert again == [plan] and select(again, 0.4, "block", "magnitude") == plan
    with pytest.raises(larosa.LarosaError, match="no plan for target 0.4, scope global"):
        select(again, 0.4, "global")
    simulated = larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(rot, plan=plan))
    report = larosa.describe(simulated)
    assert report["scope"] == "block" and report["sparsity_source"] == "searched"
    with pytest.raises(larosa.LarosaError, match="searched for scope 'block', not 'global'"):
        LaRoSaConfig(rot, plan=plan, scope="global")
    with pytest.raises(larosa.LarosaError, match="searched on"):
        larosa.sparsify(tiny_model("llama", vocab=128), LaRoSaConfig(plan=plan))
    doc = json.loads((tmp_path / "plans.json").read_text())
    doc["plans"][0]["layers"] = [{}]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(larosa.LarosaError, match="re-run larosa search"):
        load_plans(tmp_path / "bad.json")


def test_rotations_files_that_carry_plans_still_load_and_give_their_plans(calibrated, tmp_path):
    """larosa 0.1 wrote searched plans into the rotations file's metadata."""
    model, rot = calibrated
    plan = search(copy.deepcopy(model), rot, random_windows(2, seed=7), 0.4, scope="global", layers=False,
                  progress=False)
    legacy = copy.deepcopy(rot)
    keys = ("target", "scope", "score", "signal", "rotated_multiple", "split_trials", "chosen", "nll", "layers",
            "windows", "seq_len", "seconds")
    legacy.meta["plans"] = json.dumps([{k: v for k, v in plan.to_dict().items() if k in keys}])
    legacy.save(tmp_path / "r.safetensors")
    with pytest.warns(UserWarning, match="carries searched plans"):
        larosa.Rotations.load(tmp_path / "r.safetensors").check_model(model)
    (got,) = load_plans(tmp_path / "r.safetensors")
    assert got.levels == plan.levels and got.scope == "global" and got.model["config_hash"] == rot.meta["config_hash"]
    legacy.meta["plans"] = "{not json"
    legacy.save(tmp_path / "broken.safetensors")
    with pytest.raises(larosa.LarosaError, match="JSON"):
        load_plans(tmp_path / "broken.safetensors")


@pytest.mark.parametrize("scope, score", [("block", "magnitude"), ("global", "weight")])
def test_lazy_search_finds_the_plan_of_the_search_in_ram(tmp_path, scope, score):
    """Weights left on disk and every trial scored one layer at a time: the same split, per-layer levels and
    calibration NLLs as the search on the model in RAM (weight-aware scores read the resident layer's weights)."""
    path = saved_tiny(tmp_path / "m")
    eager, _ = larosa.load_model(path, device="cpu", dtype=torch.float32)
    lazy, _ = larosa.load_lazy(path)
    rot = larosa.calibrate(eager, random_windows(4, seed=3), signal="gainfree", device="cpu", progress=False)
    windows = random_windows(2, seed=7)
    want, got = (search(m, rot, windows, 0.4, scope=scope, score=score, device="cpu", progress=False)
                 for m in (eager, lazy))
    assert (got.chosen, got.rotated_multiple, got.levels) == (want.chosen, want.rotated_multiple, want.levels)
    assert got.nll == pytest.approx(want.nll, rel=1e-5)
    assert [t["nll"] for t in got.split_trials] == pytest.approx([t["nll"] for t in want.split_trials], rel=1e-5)
    assert all(p.device.type == "meta" for p in lazy.parameters())


def test_search_lazy_cli_stores_the_plan_of_the_search_in_ram(model_dir, tmp_path, capsys, monkeypatch):
    rot = tmp_path / "rot.safetensors"
    in_ram, lazy = tmp_path / "in-ram.json", tmp_path / "lazy.json"
    model, _ = larosa.load_model(str(model_dir), device="cpu")
    larosa.calibrate(model, random_windows(4, seed=3), device="cpu", progress=False).save(rot)
    common = ["search", model_dir, "--rotations", rot, "--data", tmp_path / "text.txt", "--target", "0.3,0.4",
              "--windows", 2, "--seq-len", 32, "--device", "cpu", "--json", "--quiet"]
    assert main([str(a) for a in [*common, "--out", in_ram]]) == 0

    def whole_model_forward(*args, **kwargs):
        raise AssertionError("a lazily loaded model has no weights in memory for a whole-model forward")

    monkeypatch.setattr("larosa.search.perplexity", whole_model_forward)
    capsys.readouterr()
    assert main([str(a) for a in [*common, "--lazy", "--out", lazy]]) == 0
    assert [p["target"] for p in json.loads(capsys.readouterr().out)["plans"]] == [0.3, 0.4]
    want, got = load_plans(in_ram), load_plans(lazy)
    for target in (0.3, 0.4):
        a, b = (select(plans, target, "block", "magnitude") for plans in (want, got))
        assert (b.chosen, b.rotated_multiple, b.levels) == (a.chosen, a.rotated_multiple, a.levels)
        assert b.nll == pytest.approx(a.nll, rel=1e-5)


def test_candidates_are_scored_on_held_out_windows_and_the_fixed_split_needs_beating(calibrated, monkeypatch):
    """The greedy is fitted on the first windows; every candidate (fixed split, grid, per-layer) is scored on the
    held-out ones; with a margin no candidate can meet, the fixed split is kept."""
    import larosa.search as search_module

    model, rot = calibrated
    fit, held_out = random_windows(2, seed=7), random_windows(3, seed=8)
    scored = []
    real_nll = search_module._nll
    monkeypatch.setattr(search_module, "_nll", lambda m, r, w, *a, **k: scored.append(w) or real_nll(m, r, w, *a, **k))
    plan = search(copy.deepcopy(model), rot, fit, 0.4, held_out=held_out, margin=10.0, progress=False)
    assert scored and all(w is held_out for w in scored)
    assert plan.chosen == "default" and plan.held_out == 3 and plan.windows == 2
    assert plan.levels == tuple([default_config(adapter_for(model).dims, 0.4)] * 3)
