import copy
import json
import sys

import pytest
import torch
from conftest import loads_bit_exact, random_windows, relative_error, saved_tiny, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import larosa
from larosa import LaRoSaConfig
from larosa.fold import fold, fold_streamed, save_folded
from larosa.io import CHECKSUMS, verify_checksums


def folding(rot, sparsity, **how) -> LaRoSaConfig:
    return LaRoSaConfig(rot, sparsity=sparsity, mode="folded", **how)


@pytest.fixture(scope="module")
def calibrated():
    """Per architecture: the dense model and rotations on the gain-free signal (what folded Top-K sees)."""
    from conftest import ARCHS

    out = {}
    for arch, tie in ARCHS:
        model = tiny_model(arch, tie)
        out[(arch, tie)] = model, larosa.calibrate(model, random_windows(4, seed=3), signal="gainfree", progress=False)
    return out


@pytest.mark.parametrize("arch", [("llama", False), ("llama", True), ("qwen2", True), ("qwen2", False)],
                         ids=["llama-untied", "llama-tied", "qwen2-tied", "qwen2-untied"])
@pytest.mark.parametrize("scope", ["global", "layer", "block"])
@pytest.mark.parametrize("head_rotation", [False, True], ids=["", "heads"])
def test_folded_at_sparsity_zero_equals_dense(calibrated, arch, scope, head_rotation):
    model, rot = calibrated[arch]
    windows = random_windows(2)
    with torch.no_grad():
        dense = model(windows).logits
        folded = fold(copy.deepcopy(model), folding(rot, 0.0, scope=scope, head_rotation=head_rotation))
        assert relative_error(folded(windows).logits, dense) < 1e-4
    assert type(folded).__name__.startswith("Larosa")
    adapters = [m for n, m in folded.named_modules() if n.endswith("_adapter") and m is not None]
    assert len(adapters) == {"global": 0, "layer": 2, "block": 5}[scope]  # 3 layers
    for a in adapters:
        w = a.weight.double()
        assert (w.T @ w - torch.eye(64, dtype=torch.float64)).abs().max() < 1e-5
    norms = [p for n, p in folded.named_parameters() if "norm" in n]
    assert all(torch.equal(p, torch.ones_like(p)) for p in norms)
    assert folded.lm_head.weight.data_ptr() != folded.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("scope", ["global", "layer", "block"])
def test_folded_equals_simulate_when_q_comes_from_the_same_signal(calibrated, scope):
    for model, rot in calibrated.values():
        windows = random_windows(2)
        simulated = larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(rot, sparsity=0.5, scope=scope))
        folded = fold(copy.deepcopy(model), folding(rot, 0.5, scope=scope))
        with torch.no_grad():
            a, b, dense = folded(windows).logits, simulated(windows).logits, model(windows).logits
        assert relative_error(a, b) < 1e-4
        assert relative_error(b, dense) > 1e-2  # and sparsity really changed the output
        assert larosa.site_sparsity(folded) == pytest.approx(larosa.site_sparsity(simulated))


def test_head_rotation_changes_what_o_proj_top_k_sees(calibrated):
    model, rot = calibrated[("llama", False)]
    windows = random_windows(2)
    with torch.no_grad():
        plain = fold(copy.deepcopy(model), folding(rot, 0.5))(windows).logits
        heads = fold(copy.deepcopy(model), folding(rot, 0.5, head_rotation=True))(windows).logits
    assert relative_error(heads, plain) > 1e-3


@pytest.fixture
def saved(calibrated, tmp_path):
    model, rot = calibrated[("qwen2", True)]
    folded = fold(copy.deepcopy(model), folding(rot, 0.4, scope="block", head_rotation=True))
    return folded, save_folded(folded, None, tmp_path / "folded")


def test_save_then_load_is_bit_exact_and_generates(saved):
    folded, path = saved
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(loaded) is type(folded) and loaded.config.larosa == folded.config.larosa
    a, b = folded.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    windows = random_windows(2)
    with torch.no_grad():
        assert torch.equal(folded(windows).logits, loaded(windows).logits)
    prompt = windows[:1, :8]
    out = loaded.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = folded.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 14) and torch.equal(out, ref)
    # Cached decoding runs the same sparse layers as a full forward over the generated sequence.
    with torch.no_grad():
        assert torch.equal(loaded(out[:, :-1]).logits[0, 7:].argmax(-1), out[0, 8:])


def test_corrupted_truncated_and_mismatched_directories_are_refused(saved, tmp_path):
    _, path = saved
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(larosa.LarosaError, match="corrupted or truncated"):
        AutoModelForCausalLM.from_pretrained(path)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(larosa.LarosaError, match="corrupted or truncated"):
        AutoModelForCausalLM.from_pretrained(path)
    (path / CHECKSUMS).unlink()
    with pytest.raises(larosa.LarosaError, match=f"no {CHECKSUMS}"):
        AutoModelForCausalLM.from_pretrained(path)


def test_config_that_does_not_match_the_weights_is_refused(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config["larosa"]["scope"] = "global"  # the files hold residual adapters a global model has no place for
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(larosa.LarosaError, match="do not match the folded config"):
        AutoModelForCausalLM.from_pretrained(path)


def test_interrupted_save_leaves_nothing_behind(saved, tmp_path, monkeypatch):
    folded, _ = saved

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(folded), "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        save_folded(folded, None, tmp_path / "half")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folded"]
    with pytest.raises(larosa.LarosaError, match="exists"):
        save_folded(folded, None, tmp_path / "folded")


def test_folded_models_refuse_simulation_and_refolding(saved, calibrated):
    folded, _ = saved
    _, rot = calibrated[("qwen2", True)]
    with pytest.raises(larosa.LarosaError, match="folded"):
        larosa.sparsify(folded, LaRoSaConfig(rot, sparsity=0.4))
    with pytest.raises(larosa.LarosaError, match="already folded"):
        fold(folded, folding(rot, 0.4))


def test_adapter_overhead_counts_d_squared_per_adapter():
    from larosa.arch import adapter_for
    from larosa.sparsity.levels import adapter_overhead

    dims = adapter_for(tiny_model("llama")).dims  # layer: 64*128 + 64*64 + 2*64*96 + 96*64 = 30720 weights
    assert adapter_overhead(dims, "global") == 0
    assert adapter_overhead(dims, "layer") == pytest.approx(4096 / 30720)
    assert adapter_overhead(dims, "block") == pytest.approx(2 * 4096 / 30720)


def test_fold_warns_on_gain_included_rotations_and_keeps_dtype():
    model = tiny_model("llama").to(torch.bfloat16)
    rot = larosa.calibrate(model, random_windows(2, seed=5), signal="gain", progress=False)
    with pytest.warns(UserWarning, match="gain-free"):
        folded = fold(model, folding(rot, 0.4))
    assert {p.dtype for p in folded.parameters()} == {torch.bfloat16}
    assert folded.config.larosa["scope"] == "global"  # the measured best default


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fold_keeps_the_model_on_its_device(calibrated):
    model, rot = calibrated[("llama", False)]
    folded = fold(copy.deepcopy(model).cuda(), folding(rot, 0.4))
    assert {p.device.type for p in folded.parameters()} == {"cuda"}


def _fold_both(tmp_path, arch, tie, scope, score, head_rotation=False, dtype=torch.float32, shard="1GB",
               sparsity=0.4):
    """One checkpoint on disk folded both ways: (the in-RAM folded model, save_folded's directory, the rotations,
    fold_streamed's directory, its returned config)."""
    path = saved_tiny(tmp_path / "m", arch, shard=shard, tie=tie)
    model, tok = larosa.load_model(path, device="cpu", dtype=dtype)
    rot = larosa.calibrate(model, random_windows(4, seed=3), signal="gainfree", device="cpu", progress=False)
    how = {"scope": scope, "score": score, "head_rotation": head_rotation}
    folded = fold(model, folding(rot, sparsity, **how))
    in_ram = save_folded(folded, tok, tmp_path / "in-ram")
    lazy, tok = larosa.load_lazy(path, dtype=dtype)
    config = fold_streamed(lazy, folding(rot, sparsity, **how), tmp_path / "streamed", tokenizer=tok)
    assert all(p.device.type == "meta" for p in lazy.parameters())  # nothing was kept resident
    return folded, in_ram, tmp_path / "streamed", config


def _tensors(path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


STREAMED = [  # arch, tied, scope, score, head rotation, dtype, checkpoint shard size, sparsity
    ("llama", False, "global", "magnitude", False, torch.float32, "1GB", 0.4),
    ("llama", True, "layer", "magnitude", True, torch.bfloat16, "1GB", 0.4),
    ("qwen2", True, "block", "magnitude", False, torch.float32, "1GB", 0.5),
    ("qwen2", False, "global", "weight", True, torch.float32, "100KB",
     [larosa.SparsityConfig(0.2, 0.3, 0.4, 0.5), larosa.SparsityConfig(0.5, 0.5, 0.5, 0.5),
      larosa.SparsityConfig(0.0, 0.1, 0.2, 0.3)]),
    ("llama", True, "block", "weight", False, torch.bfloat16, "1GB", 0.4),
]


@pytest.mark.parametrize("arch, tie, scope, score, heads, dtype, shard, sparsity", STREAMED,
                         ids=["llama-untied-global", "llama-tied-layer-heads-bf16", "qwen2-tied-block",
                              "qwen2-untied-global-weight-heads-plan-sharded", "llama-tied-block-weight-bf16"])
def test_streamed_fold_writes_what_the_fold_in_ram_saves(tmp_path, arch, tie, scope, score, heads, dtype, shard,
                                                         sparsity):
    folded, in_ram, streamed, config = _fold_both(tmp_path, arch, tie, scope, score, heads, dtype, shard, sparsity)
    a, b = _tensors(in_ram), _tensors(streamed)
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype == dtype and torch.equal(a[k], b[k]) for k in a)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (streamed / name).read_text() == (in_ram / name).read_text(), name
    assert config.larosa == folded.config.larosa
    # A shard per decoder layer, one for the embedding and one for the head and final norm, all indexed.
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    shards = sorted(streamed.glob("model-*.safetensors"))
    assert len(shards) == 3 + 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    for p in shards:
        keys = load_file(p).keys()
        assert all(index["weight_map"][k] == p.name for k in keys)
        assert len({k.split(".")[2] for k in keys if k.startswith("model.layers.")}) <= 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in b.values())
    # Every file is listed (so that overwrite knows the directory as larosa's); the weights are verified.
    assert json.loads((streamed / CHECKSUMS).read_text()).keys() == {p.name for p in streamed.iterdir()} - {CHECKSUMS}
    verify_checksums(streamed)


@pytest.mark.parametrize("arch, tie, scope, score", [("llama", True, "block", "weight"),
                                                     ("qwen2", False, "layer", "magnitude")])
def test_streamed_fold_loads_as_the_folded_model_in_ram(tmp_path, arch, tie, scope, score):
    folded, _, streamed, _ = _fold_both(tmp_path, arch, tie, scope, score)
    loaded, _ = larosa.load_model(str(streamed), device="cpu")
    assert type(loaded) is type(folded) and loaded.config.larosa == folded.config.larosa
    windows = random_windows(2)
    with torch.no_grad():
        assert torch.equal(loaded(windows).logits, folded(windows).logits)
    shard = streamed / "model-00003-of-00005.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(larosa.LarosaError, match="model-00003-of-00005.safetensors is corrupted"):
        larosa.load_model(str(streamed), device="cpu")


def test_interrupted_streamed_fold_leaves_nothing_behind(tmp_path, monkeypatch):
    path = saved_tiny(tmp_path / "m")
    model, _ = larosa.load_model(path, device="cpu")
    rot = larosa.calibrate(model, random_windows(2), signal="gainfree", device="cpu", progress=False)
    lazy, _ = larosa.load_lazy(path)
    written = []

    def crash_on_the_third_shard(tensors, file, **kwargs):
        written.append(file)
        if len(written) == 3:
            raise KeyboardInterrupt

    # the module (larosa.fold.folding), not the package
    monkeypatch.setattr(sys.modules["larosa.fold.folding"], "save_file", crash_on_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        fold_streamed(lazy, folding(rot, 0.4), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    with pytest.raises(larosa.LarosaError, match="exists"):
        fold_streamed(lazy, folding(rot, 0.4), tmp_path / "m")
    assert len(written) == 3  # refused before any weight was read


def test_folded_threshold_selection_equals_simulate_and_survives_save_and_load(calibrated, tmp_path):
    model, rot = calibrated[("llama", False)]
    calib, windows = random_windows(4, seed=9), random_windows(2)
    simulated = larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(rot, sparsity=0.5, scope="global",
                                                                   select="threshold", calib=calib), progress=False)
    thresholds = larosa.sparsity.sites.settings(simulated)["thresholds"]
    folded = fold(copy.deepcopy(model), folding(rot, 0.5, select="threshold", thresholds=thresholds))
    assert folded.config.larosa["select"] == "threshold" and folded.config.larosa["thresholds"] == thresholds
    with torch.no_grad():
        assert relative_error(folded(windows).logits, simulated(windows).logits) < 1e-4
    loads_bit_exact(folded, tmp_path / "f", windows)
    # calibrated on the folded model itself (the one call): the same thresholds up to float rounding
    own = larosa.sparsify(copy.deepcopy(model), folding(rot, 0.5, select="threshold", calib=calib), progress=False)
    for mine, theirs in zip(own.config.larosa["thresholds"], thresholds):
        assert mine == pytest.approx(theirs, rel=1e-4)
    lazy_model, _ = larosa.load_lazy(saved_tiny(tmp_path / "m"))
    with pytest.raises(larosa.LarosaError, match="calibrated thresholds, not calibration windows"):
        fold_streamed(lazy_model, folding(rot, 0.5, select="threshold", calib=calib), tmp_path / "s")


@pytest.mark.parametrize("signal", ["gain", "gainfree"])
@pytest.mark.parametrize("scope", ["global", "layer", "block"])
def test_the_input_form_is_dense_at_zero_and_simulate_at_any_sparsity(signal, scope, tmp_path):
    """The input form transforms each block's normed input by diag(g) Q (Q for the gain-free signal) and leaves the
    residual stream alone: at sparsity 0 it is the dense model, and at 50 % it is simulate mode with the same Q,
    whichever signal the rotations came from (the residual form folds only the gain-free one exactly)."""
    for arch, tie in (("llama", False), ("qwen2", True)):
        model, windows = tiny_model(arch, tie), random_windows(2)
        rot = larosa.calibrate(model, random_windows(4, seed=3), signal=signal, progress=False)
        with torch.no_grad():
            dense = model(windows).logits
            zero = fold(copy.deepcopy(model), folding(rot, 0.0, scope=scope, form="input", head_rotation=True))
            assert relative_error(zero(windows).logits, dense) < 1e-4
            folded = fold(copy.deepcopy(model), folding(rot, 0.5, scope=scope, form="input"))
            simulated = larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(rot, sparsity=0.5, scope=scope))
            a, b = folded(windows).logits, simulated(windows).logits
            assert relative_error(a, b) < 1e-4 and relative_error(b, dense) > 1e-2
        assert larosa.site_sparsity(folded) == pytest.approx(larosa.site_sparsity(simulated))
        transforms = [n for n, _ in folded.named_modules() if n.endswith("_transform")]
        assert len(transforms) == 6 and not [n for n, m in folded.named_modules() if n.endswith("_adapter") and m]
        assert larosa.describe(folded)["form"] == "input"
        assert larosa.describe(folded)["adapter_overhead"] == pytest.approx(2 * 64**2 / 30720)
    loads_bit_exact(folded, tmp_path / "f", windows)
    with pytest.raises(larosa.LarosaError, match="folded mode only"):
        LaRoSaConfig(rot, sparsity=0.5, form="input")


def test_folded_centring_equals_simulate_and_saves_its_offsets(calibrated, tmp_path):
    model, rot = calibrated[("llama", True)]
    calib, windows = random_windows(4, seed=9), random_windows(2)
    simulated = larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(rot, sparsity=0.5, scope="global",
                                                                   centre="median", calib=calib), progress=False)
    folded = larosa.sparsify(copy.deepcopy(model), folding(rot, 0.5, centre="median", calib=calib), progress=False)
    assert folded.config.larosa["centre"] == "median"
    with torch.no_grad():
        assert relative_error(folded(windows).logits, simulated(windows).logits) < 1e-4
    loaded = loads_bit_exact(folded, tmp_path / "f", windows)
    assert torch.equal(loaded.model.layers[1].larosa_sites["down_in"].offset,
                       folded.model.layers[1].larosa_sites["down_in"].offset)


@pytest.mark.parametrize("signal", ["gain", "gainfree"])
@pytest.mark.parametrize("scope", ["layer", "block"])
def test_the_weighted_objective_folds_in_the_input_form_exactly(signal, scope, tmp_path):
    """Rotations of diag(n) XᵀX diag(n) act as diag(n) Q: dense at sparsity 0 simulated and folded, the folded input
    form equal to simulate at 50 % (the layer scope scales both blocks by the attention's n, as its Q is shared), a
    different selection than plain PCA, refused by the residual form, which needs an orthogonal transform, and so
    folded in the input form by default."""
    model, windows = tiny_model("llama", True), random_windows(2)
    calib = random_windows(4, seed=3)
    rot = larosa.calibrate(model, calib, signal=signal, objective="weighted", progress=False)
    pca = larosa.calibrate(model, calib, signal=signal, progress=False)
    assert rot.objective == "weighted" and rot.meta["objective"] == "weighted"
    n = rot.tensors["layers.0.mlp.norms"]
    assert n.shape == (64,) and bool((n > 0).all()) and not torch.allclose(n, n.mean().expand(64))
    with torch.no_grad():
        dense = model(windows).logits
        zero = larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(rot, sparsity=0.0, scope=scope))
        assert relative_error(zero(windows).logits, dense) < 1e-5
        simulated = larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(rot, sparsity=0.5, scope=scope))
        folded = fold(copy.deepcopy(model), folding(rot, 0.5, scope=scope, form="input"))
        plain = larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(pca, sparsity=0.5, scope=scope))
        a, b, c = folded(windows).logits, simulated(windows).logits, plain(windows).logits
        assert relative_error(a, b) < 1e-4 and relative_error(b, c) > 1e-3
    with pytest.raises(larosa.LarosaError, match="--form input"):
        folding(rot, 0.5, scope=scope, form="residual")
    by_default = fold(copy.deepcopy(model), folding(rot, 0.5, scope=scope))  # the input form, which folds it
    assert by_default.config.larosa["form"] == "input"
    with torch.no_grad():
        assert torch.equal(by_default(windows).logits, a)
    loaded = loads_bit_exact(folded, tmp_path / "f", windows)
    assert loaded.config.larosa["rotations"]["objective"] == "weighted"
