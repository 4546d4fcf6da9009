import json

import pytest
import torch

from larosa.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_calibrate_weighted_objective_in_ram_and_lazy_then_fold_in_the_input_form(model_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    files = {lazy: tmp_path / f"w{lazy}.safetensors" for lazy in ((), ("--lazy",))}
    for lazy, rot in files.items():
        code, out, _ = run(capsys, "calibrate", model_dir, "--data", text, "--out", rot, "--windows", 4,
                           "--seq-len", 32, "--objective", "weighted", "--device", "cpu", "--json", "--quiet", *lazy)
        assert code == 0 and json.loads(out)["objective"] == "weighted"
    from larosa import Rotations

    a, b = (Rotations.load(f) for f in files.values())
    torch.testing.assert_close(b.tensors["layers.2.mlp.norms"], a.tensors["layers.2.mlp.norms"])
    torch.testing.assert_close(b.q("global"), a.q("global"), rtol=1e-5, atol=1e-6)
    common = ("eval", "ppl", model_dir, "--data", text, "--seq-len", 32, "--windows", 2, "--rotations", files[()],
              "--sparsity", 0.5, "--mode", "folded", "--json", "--quiet")
    code, out, _ = run(capsys, *common, "--form", "input")
    assert code == 0 and json.loads(out)["ppl"] > 0
    code, by_default, _ = run(capsys, *common)  # the input form, the one that folds these rotations
    assert code == 0 and json.loads(by_default)["ppl"] == json.loads(out)["ppl"]
    code, _, err = run(capsys, *common, "--form", "residual")
    assert code == 2 and "--form input" in err


def test_calibrate_then_eval_ppl_json(model_dir, tmp_path, capsys):
    text, rot = tmp_path / "text.txt", tmp_path / "rot.safetensors"
    code, out, _ = run(capsys, "calibrate", model_dir, "--data", text, "--out", rot, "--windows", 4,
                       "--seq-len", 32, "--device", "cpu", "--json", "--quiet")  # as the lazy run below
    assert code == 0 and rot.exists()
    meta = json.loads(out)
    assert meta["tokens"] == "128" and meta["num_layers"] == "3"
    lazy = tmp_path / "lazy.safetensors"
    code, out, _ = run(capsys, "calibrate", model_dir, "--data", text, "--out", lazy, "--windows", 4,
                       "--seq-len", 32, "--lazy", "--device", "cpu", "--json", "--quiet")
    from larosa import Rotations

    a, b = Rotations.load(rot), Rotations.load(lazy)
    assert code == 0 and a.meta["weights_fingerprint"] == b.meta["weights_fingerprint"]
    torch.testing.assert_close(b.q("global"), a.q("global"), rtol=1e-5, atol=1e-6)

    # float32 pinned: on a GPU the default would be bf16, and the in-RAM and streamed (CPU) runs below would differ
    common = ("eval", "ppl", model_dir, "--data", text, "--seq-len", 32, "--windows", 3, "--dtype", "float32",
              "--json", "--quiet")
    code, out, _ = run(capsys, *common)
    dense = json.loads(out)
    assert code == 0 and dense["tokens"] == 3 * 31 and dense["windows"] == 3 and dense["site_sparsity"] == {}
    assert set(dense) >= {"ppl", "tokens", "windows", "nominal_sparsity", "param_weighted_sparsity",
                          "site_sparsity", "seconds"}

    for sparsity in ((), ("--rotations", rot, "--sparsity", 0.5, "--scope", "global")):
        code, out, _ = run(capsys, *common, *sparsity)
        in_ram = json.loads(out)
        code, out, _ = run(capsys, *common, *sparsity, "--lazy", "--device", "cpu")
        streamed = json.loads(out)
        assert code == 0 and streamed["ppl"] == pytest.approx(in_ram["ppl"], rel=1e-5)
        assert streamed["param_weighted_sparsity"] == in_ram["param_weighted_sparsity"]
    code, _, err = run(capsys, *common, "--rotations", rot, "--sparsity", 0.4, "--mode", "folded", "--lazy")
    assert code == 2 and "--lazy scores the dense model" in err

    code, out, _ = run(capsys, *common, "--rotations", rot, "--sparsity", 0)
    zero = json.loads(out)
    assert zero["ppl"] == pytest.approx(dense["ppl"], rel=1e-5)

    code, out, _ = run(capsys, *common, "--rotations", rot, "--sparsity", 0.5, "--site", "down_in=0.25")
    sparse = json.loads(out)
    assert sparse["nominal_sparsity"] == 0.5
    assert sparse["configured_site_sparsity"] == pytest.approx(
        {"attn_in": 0.4, "o_in": 0.6, "mlp_in": 0.4, "down_in": 0.25})
    for site, s in sparse["configured_site_sparsity"].items():
        assert sparse["site_sparsity"][site] == pytest.approx(s, abs=1 / 64)
    assert 0 < sparse["param_weighted_sparsity"] < 0.6 and sparse["ppl"] != dense["ppl"]


@pytest.mark.parametrize("argv, message", [
    (["--sparsity", 1.2], "must be in [0, 1)"),
    (["--rotations", "missing.safetensors", "--sparsity", 0.4], "rotations file not found"),
    (["--rotations", "text.txt"], "text.txt is not a readable safetensors file"),  # found before the model loads
])
def test_bad_input_exits_2_with_a_message(model_dir, tmp_path, capsys, argv, message):
    argv = [str(tmp_path / a) if str(a).endswith((".safetensors", ".txt")) else a for a in argv]
    code, _, err = run(capsys, "eval", "ppl", model_dir, "--data", tmp_path / "text.txt", "--seq-len", 32,
                       "--quiet", *argv)
    assert code == 2 and message in err


def test_rotations_for_another_model_exit_2(model_dir, tmp_path, capsys):
    from conftest import random_windows, tiny_model

    import larosa

    larosa.calibrate(tiny_model("qwen2"), random_windows(), progress=False).save(tmp_path / "q.safetensors")
    code, _, err = run(capsys, "eval", "ppl", model_dir, "--data", tmp_path / "text.txt", "--seq-len", 32,
                       "--quiet", "--rotations", tmp_path / "q.safetensors", "--sparsity", 0.4)
    assert code == 2 and "calibrate this model first" in err


def test_sparsify_writes_a_directory_that_eval_reads_like_the_in_memory_fold(model_dir, tmp_path, capsys):
    text, rot, out = tmp_path / "text.txt", tmp_path / "rot.safetensors", tmp_path / "folded"
    assert run(capsys, "calibrate", model_dir, "--data", text, "--out", rot, "--windows", 4, "--seq-len", 32,
               "--signal", "gainfree", "--quiet")[0] == 0
    settings = ("--rotations", rot, "--sparsity", 0.4, "--scope", "block")
    code, printed, _ = run(capsys, "sparsify", model_dir, *settings, "--out", out, "--json", "--quiet")
    assert code == 0 and json.loads(printed)["scope"] == "block"
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()

    common = ("--data", text, "--seq-len", 32, "--windows", 3, "--dtype", "float32", "--json", "--quiet")  # bf16 on GPU
    saved = json.loads(run(capsys, "eval", "ppl", out, *common)[1])
    in_memory = json.loads(run(capsys, "eval", "ppl", model_dir, *common, *settings, "--mode", "folded")[1])
    simulated = json.loads(run(capsys, "eval", "ppl", model_dir, *common, *settings)[1])
    assert saved["mode"] == in_memory["mode"] == "folded" and simulated["mode"] == "simulate"
    assert saved["ppl"] == pytest.approx(in_memory["ppl"], rel=1e-6)
    assert simulated["ppl"] == pytest.approx(in_memory["ppl"], rel=1e-4)
    assert saved["site_sparsity"] == pytest.approx(simulated["site_sparsity"])
    assert saved["param_weighted_sparsity"] == pytest.approx(simulated["param_weighted_sparsity"])

    code, _, err = run(capsys, "sparsify", model_dir, *settings, "--out", out, "--quiet")
    assert code == 2 and "exists" in err


@pytest.mark.parametrize("form", ["", "rotated-centred", "default"])
def test_sparsify_teal_writes_a_directory_that_loads_with_its_thresholds(model_dir, tmp_path, capsys, form):
    """`sparsify --method teal-greedy` saves the model with TEAL's thresholds (with --rotations and --centre: on the
    rotated model, centred; sparsify's default for a --target: the same, weight-aware, = eval's --select greedy):
    eval reads the same perplexity as TEAL calibrated in memory, and generate runs it in the engine."""
    text, out, rot = tmp_path / "text.txt", tmp_path / "teal", tmp_path / "rot.safetensors"
    calib = ("--target", 0.4, "--calib-data", text, "--calib-windows", 2, "--calib-seq-len", 32)
    teal = ("--method", "teal-greedy", *calib)
    if form:
        assert run(capsys, "calibrate", model_dir, "--data", text, "--out", rot, "--windows", 2, "--seq-len", 32,
                   "--signal", "gainfree", "--quiet")[0] == 0
        teal = (*calib, "--rotations", rot) if form == "default" else (*teal, "--rotations", rot, "--centre", "median")
    code, printed, _ = run(capsys, "sparsify", model_dir, *teal, "--out", out, "--dtype", "float32", "--json",
                           "--quiet")
    assert code == 0 and json.loads(printed)["method"] == "teal-greedy"
    if form == "default":
        described = json.loads(printed)
        assert (described["scope"], described["centre"], described["score"]) == ("global", "median", "weight")
        teal += ("--select", "greedy")  # eval's default is exact Top-K
    common = ("--data", text, "--seq-len", 32, "--windows", 3, "--dtype", "float32", "--json", "--quiet")
    saved = json.loads(run(capsys, "eval", "ppl", out, *common)[1])
    in_memory = json.loads(run(capsys, "eval", "ppl", model_dir, *common, *teal)[1])
    dense = json.loads(run(capsys, "eval", "ppl", model_dir, *common)[1])
    assert saved["method"] == "teal-greedy" and saved["ppl"] == pytest.approx(in_memory["ppl"], rel=1e-6)
    assert saved["ppl"] != pytest.approx(dense["ppl"], rel=1e-4)
    code, printed, _ = run(capsys, "generate", out, "--prompt", "the", "--max-new-tokens", 5, "--json", "--quiet",
                           "--dtype", "float32", "--device", "cpu")
    assert code == 0 and json.loads(printed)["method"] == "teal-greedy" and json.loads(printed)["new_tokens"] >= 1
    code, _, err = run(capsys, "sparsify", model_dir, "--target", 0.4, "--out", tmp_path / "x", "--quiet")
    assert code == 2 and "give --rotations" in err
    code, _, err = run(capsys, "sparsify", model_dir, *teal, "--sparsity", 0.4, "--out", tmp_path / "y", "--quiet")
    assert code == 2 and ("takes no --sparsity" in err or "not both" in err)
    code, _, err = run(capsys, "eval", "ppl", model_dir, "--data", text, "--method", "cats", "--target", 0.4,
                       "--calib-data", text, "--seq-len", 32, "--centre", "median", "--quiet")
    assert code == 2 and "not CATS" in err
    if form == "default":
        code, _, err = run(capsys, "sparsify", model_dir, "--rotations", rot, "--target", 0.4, "--out", tmp_path / "z",
                           "--quiet")
        assert code == 2 and "--select greedy" in err and "--select topk" in err
        code, _, err = run(capsys, "sparsify", model_dir, "--rotations", rot, "--sparsity", 0.4, "--select", "greedy",
                           *calib[2:], "--out", tmp_path / "z", "--quiet")
        assert code == 2 and "parameter-weighted target" in err
        code, _, err = run(capsys, "sparsify", model_dir, *calib, "--rotations", rot, "--scope", "block",
                           "--out", tmp_path / "z", "--quiet")
        assert code == 2 and "global scope only" in err
        code, _, err = run(capsys, "sparsify", model_dir, *calib, "--rotations", rot, "--lazy", "--out", tmp_path / "z",
                           "--quiet")
        assert code == 2 and "leave out --lazy" in err and "--select topk" in err


def test_sparsify_lazy_writes_what_sparsify_in_ram_writes_and_leaves_the_checkpoint(model_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    from larosa.assets import sha256

    text, rot = tmp_path / "text.txt", tmp_path / "rot.safetensors"
    assert run(capsys, "calibrate", model_dir, "--data", text, "--out", rot, "--windows", 4, "--seq-len", 32,
               "--signal", "gainfree", "--quiet")[0] == 0
    before = {p.name: sha256(p) for p in model_dir.iterdir()}
    settings = ("--rotations", rot, "--sparsity", 0.4, "--scope", "block", "--score", "weight", "--json", "--quiet")
    reports = {}
    for name, lazy in (("in-ram", ()), ("lazy", ("--lazy",))):
        code, printed, _ = run(capsys, "sparsify", model_dir, *settings, *lazy, "--out", tmp_path / name)
        assert code == 0
        reports[name] = {k: v for k, v in json.loads(printed).items() if k != "out"}
    assert reports["lazy"] == reports["in-ram"] and reports["lazy"]["score"] == "weight"
    assert {p.name: sha256(p) for p in model_dir.iterdir()} == before
    a, b = (load_file(tmp_path / "in-ram" / "model.safetensors"),
            {k: v for p in (tmp_path / "lazy").glob("model-*.safetensors") for k, v in load_file(p).items()})
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    common = ("--data", text, "--seq-len", 32, "--windows", 2, "--json", "--quiet")
    ppl = {name: json.loads(run(capsys, "eval", "ppl", tmp_path / name, *common)[1])["ppl"] for name in reports}
    assert ppl["lazy"] == ppl["in-ram"]

    code, _, err = run(capsys, "sparsify", model_dir, *settings, "--lazy", "--out", tmp_path / "lazy")
    assert code == 2 and "exists" in err
    weights = model_dir / "model.safetensors"
    torch.save(load_file(weights), model_dir / "pytorch_model.bin")
    weights.unlink()
    code, _, err = run(capsys, "sparsify", model_dir, *settings, "--lazy", "--out", tmp_path / "bin")
    assert code == 2 and "safetensors checkpoints only" in err and not (tmp_path / "bin").exists()


def test_search_then_eval_and_sparsify_use_the_plan_file(model_dir, tmp_path, capsys):
    text, rot, plans = tmp_path / "text.txt", tmp_path / "rot.safetensors", tmp_path / "plans.json"
    assert run(capsys, "calibrate", model_dir, "--data", text, "--out", rot, "--windows", 4, "--seq-len", 32,
               "--signal", "gainfree", "--quiet")[0] == 0
    code, out, _ = run(capsys, "search", model_dir, "--rotations", rot, "--data", text, "--target", "0.4",
                       "--windows", 2, "--seq-len", 32, "--device", "cpu", "--json", "--quiet", "--out", plans)
    assert code == 0 and json.loads(out)["plans"][0]["target"] == 0.4

    common = ("eval", "ppl", model_dir, "--data", text, "--seq-len", 32, "--windows", 2, "--json", "--quiet",
              "--rotations", rot, "--target", 0.4)
    plan = json.loads(run(capsys, *common, "--plan", plans)[1])
    fixed = json.loads(run(capsys, *common)[1])
    assert plan["sparsity_source"] == "searched" and fixed["sparsity_source"] == "split"
    assert plan["scope"] == "block"  # the plan's scope
    code, _, err = run(capsys, *common, "--plan", plans, "--score", "weight")
    assert code == 2 and "no plan for target 0.4, score weight" in err  # it was searched for magnitude scores
    for r in (plan, fixed):
        assert r["param_weighted_sparsity"] == pytest.approx(0.4)
        assert r["measured_param_weighted"] == pytest.approx(0.4, abs=0.02)
    from larosa.sparsity.plan import load_plans

    # the search keeps the fixed split unless a candidate beats it on its held-out windows
    assert (plan["ppl"] == fixed["ppl"]) == (load_plans(plans)[0].chosen == "default")

    code, out, _ = run(capsys, "sparsify", model_dir, "--rotations", rot, "--plan", plans, "--out", tmp_path / "f",
                       "--json", "--quiet")
    assert code == 0 and json.loads(out)["sparsity_source"] == "searched" and json.loads(out)["scope"] == "block"
    saved = json.loads(run(capsys, "eval", "ppl", tmp_path / "f", *common[3:-4])[1])
    assert saved["param_weighted_sparsity"] == pytest.approx(0.4)

    code, _, err = run(capsys, *common, "--sparsity", 0.4)
    assert code == 2 and "not both" in err


def test_compare_writes_json_table_plot_and_reusable_plans(model_dir, tmp_path, capsys):
    text, out = tmp_path / "text.txt", tmp_path / "cmp"
    code, printed, _ = run(capsys, "compare", model_dir, "--target", "0.25,0.6", "--data", text, "--windows", 2,
                           "--calib-data", text, "--calib-windows", 3, "--search-windows", 2, "--seq-len", 32,
                           "--device", "cpu", "--out", out, "--json", "--quiet")
    assert code == 0
    result = json.loads(printed)
    assert len(result["rows"]) == 15 and "| LaRoSa, searched + weight-aware |" in result["table"]
    assert "| LaRoSa greedy (sparsify's default): global rotation, centred, weight-aware |" in result["table"]
    for r in result["rows"][1:]:
        if r["method"] == "cats" and r["target"] == 0.6:  # CATS gates up + down only: 0.6 is out of its reach
            assert "out of reach" in r["error"]
        else:  # thresholds come from the calibration text, so they hold on it only roughly
            assert r["measured_param_weighted"] == pytest.approx(r["target"], abs=0.05), r["method"]
    assert {p.name for p in out.iterdir()} == {"compare.json", "compare.md", "compare.png", "rotations.safetensors",
                                               "plans.json"}
    from larosa.sparsity.plan import load_plans, select

    assert select(load_plans(out / "plans.json"), 0.6, "block", "weight").target == 0.6
    code, _, err = run(capsys, "compare", model_dir, "--methods", "dense,magic", "--data", text,
                       "--calib-data", text, "--seq-len", 32)
    assert code == 2 and "unknown method" in err


def test_compare_resumes_an_interrupted_run_and_refuses_other_settings(model_dir, tmp_path, capsys, monkeypatch):
    import larosa.compare

    text, out = tmp_path / "text.txt", tmp_path / "cmp"
    common = ("compare", model_dir, "--data", text, "--windows", 2, "--calib-data", text, "--calib-windows", 3,
              "--search-windows", 2, "--seq-len", 32, "--device", "cpu", "--out", out, "--json", "--quiet")
    real_apply = larosa.compare._apply

    def dies_on_search(model, method, *args):
        if method == "larosa-searched":
            raise KeyboardInterrupt  # the time limit strikes in the middle of the third run
        return real_apply(model, method, *args)

    monkeypatch.setattr(larosa.compare, "_apply", dies_on_search)
    code, _, err = run(capsys, *common, "--methods", "dense,larosa,larosa-searched", "--target", "0.3")
    assert code == 130 and err.strip().splitlines()[-1] == "larosa: interrupted; no output was left half-written"
    partial = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in partial["rows"]] == ["dense", "larosa"]
    assert "| LaRoSa, searched | not run yet |" in (out / "compare.md").read_text()

    monkeypatch.setattr(larosa.compare, "_apply", real_apply)
    code, printed, _ = run(capsys, *common, "--methods", "larosa-searched", "--target", "0.3")
    result = json.loads(printed)
    assert code == 0 and [r["method"] for r in result["rows"]] == ["larosa-searched", "dense", "larosa"]
    assert result["rows"][1:] == partial["rows"]  # kept, not re-run
    assert json.loads((out / "compare.json").read_text())["rows"] == result["rows"]

    code, _, err = run(capsys, *common, "--search-windows", 1, "--target", "0.3")
    assert code == 2 and "other settings (search_windows)" in err
    (out / "compare.json").write_text("{")
    code, _, err = run(capsys, *common, "--target", "0.3")
    assert code == 2 and "not a larosa comparison" in err


def test_eval_ppl_runs_the_peers_at_a_parameter_weighted_target(model_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    common = ("eval", "ppl", model_dir, "--data", text, "--seq-len", 32, "--windows", 3, "--json", "--quiet")
    dense = json.loads(run(capsys, *common)[1])
    for method in ("teal", "teal-greedy", "cats"):
        code, out, _ = run(capsys, *common, "--method", method, "--target", 0.3, "--calib-data", text,
                           "--calib-windows", 3)
        r = json.loads(out)
        assert code == 0 and r["mode"] == "simulate" and r["method"].startswith(method.split("-")[0])
        assert r["measured_param_weighted"] == pytest.approx(0.3, abs=0.03)  # calibrated on these very windows
        assert r["ppl"] != dense["ppl"]
    code, _, err = run(capsys, *common, "--method", "teal", "--target", 0.3)
    assert code == 2 and "--calib-data" in err
    code, _, err = run(capsys, *common, "--method", "cats", "--target", 0.3, "--calib-data", text, "--sparsity", 0.3)
    assert code == 2 and "takes no" in err


def test_threshold_selection_from_the_command_line(model_dir, tmp_path, capsys):
    text, rot, out = tmp_path / "text.txt", tmp_path / "rot.safetensors", tmp_path / "folded"
    assert run(capsys, "calibrate", model_dir, "--data", text, "--out", rot, "--windows", 4, "--seq-len", 32,
               "--signal", "gainfree", "--quiet")[0] == 0
    select = ("--select", "threshold", "--calib-data", text, "--calib-windows", 4, "--calib-seq-len", 32)
    code, printed, _ = run(capsys, "sparsify", model_dir, "--rotations", rot, "--sparsity", 0.5, *select,
                           "--out", out, "--json", "--quiet")
    report = json.loads(printed)
    assert code == 0 and report["select"] == "threshold" and len(report["thresholds"]) == 3
    common = ("--data", text, "--seq-len", 32, "--windows", 4, "--dtype", "float32", "--json", "--quiet")
    saved = json.loads(run(capsys, "eval", "ppl", out, *common)[1])
    assert saved["select"] == "threshold" and saved["mode"] == "folded"
    # scored on the text the thresholds were calibrated on, each site drops about its share
    assert saved["measured_param_weighted"] == pytest.approx(saved["param_weighted_sparsity"], abs=0.03)
    simulated = json.loads(run(capsys, "eval", "ppl", model_dir, *common, "--rotations", rot, "--sparsity", 0.5,
                               "--scope", "global", *select)[1])
    assert simulated["mode"] == "simulate" and simulated["ppl"] == pytest.approx(saved["ppl"], rel=1e-3)
    code, _, err = run(capsys, "eval", "ppl", model_dir, *common, "--rotations", rot, "--sparsity", 0.5,
                       "--select", "threshold")
    assert code == 2 and "--calib-data" in err
    code, _, err = run(capsys, "eval", "ppl", model_dir, *common, "--rotations", rot, "--sparsity", 0.5, *select,
                       "--lazy")
    assert code == 2 and "leave out --lazy" in err


def test_compare_runs_thresholds_and_centring_and_counts_the_bytes_each_row_reads(model_dir, tmp_path, capsys):
    from larosa.arch import adapter_for
    from larosa.models import load_model
    from larosa.sparsity.levels import adapter_overhead

    text = tmp_path / "text.txt"
    methods = ("teal,larosa,larosa-threshold,larosa-searched-threshold,larosa-centred,larosa-centred-threshold,"
               "larosa-searched-wa-threshold,larosa-searched-centred-threshold,larosa-greedy")
    code, printed, _ = run(capsys, "compare", model_dir, "--target", "0.4", "--data", text, "--windows", 2,
                           "--calib-data", text, "--calib-windows", 3, "--search-windows", 2,
                           "--held-out-windows", 2, "--seq-len", 32, "--device", "cpu", "--methods", methods,
                           "--json", "--quiet")
    assert code == 0
    result = json.loads(printed)
    dims = adapter_for(load_model(str(model_dir), device="cpu")[0]).dims
    input_form = adapter_overhead(dims, "block", "input")  # Q of the gain-included signal folds in the input form
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == set(methods.split(","))
    for name, r in rows.items():
        extra = 0.0 if name in ("teal", "larosa-greedy") else input_form  # the greedy row's model has no adapters
        assert r["relative_bytes"] == pytest.approx(1 - r["measured_param_weighted"] + extra)
        assert r["measured_param_weighted"] == pytest.approx(0.4, abs=0.06), name
    assert rows["larosa-centred"]["settings"]["centre"] == "median"
    assert rows["larosa-threshold"]["settings"]["select"] == "threshold"
    assert rows["larosa-searched-centred-threshold"]["settings"]["centre"] == "median"
    assert rows["larosa-searched-wa-threshold"]["settings"]["select"] == "threshold"
    assert "| LaRoSa, centred + thresholds |" in result["table"]
    assert rows["larosa-greedy"]["settings"]["rotated"] == "global"
    assert (rows["larosa-greedy"]["settings"]["centre"], rows["larosa-greedy"]["settings"]["score"]) == (
        "median", "weight")
