import copy
import json

import pytest
import torch
from conftest import random_windows, tiny_model
from transformers import AutoModelForCausalLM

import larosa
from larosa.fold import CHECKSUMS, fold, save_folded


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


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
        folded = fold(copy.deepcopy(model), rot, 0.0, scope=scope, head_rotation=head_rotation)
        assert _rel(folded(windows).logits, dense) < 1e-4
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
        simulated = larosa.sparsify(copy.deepcopy(model), rot, 0.5, scope=scope)
        folded = fold(copy.deepcopy(model), rot, 0.5, scope=scope)
        with torch.no_grad():
            a, b, dense = folded(windows).logits, simulated(windows).logits, model(windows).logits
        assert _rel(a, b) < 1e-4
        assert _rel(b, dense) > 1e-2  # and sparsity really changed the output
        assert larosa.site_sparsity(folded) == pytest.approx(larosa.site_sparsity(simulated))


def test_head_rotation_changes_what_o_proj_top_k_sees(calibrated):
    model, rot = calibrated[("llama", False)]
    windows = random_windows(2)
    with torch.no_grad():
        plain = fold(copy.deepcopy(model), rot, 0.5)(windows).logits
        heads = fold(copy.deepcopy(model), rot, 0.5, head_rotation=True)(windows).logits
    assert _rel(heads, plain) > 1e-3


@pytest.fixture
def saved(calibrated, tmp_path):
    model, rot = calibrated[("qwen2", True)]
    folded = fold(copy.deepcopy(model), rot, 0.4, scope="block", head_rotation=True)
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
        larosa.sparsify(folded, rot, 0.4)
    with pytest.raises(larosa.LarosaError, match="already folded"):
        fold(folded, rot, 0.4)


def test_adapter_overhead_counts_d_squared_per_adapter():
    from larosa.adapters import adapter_for

    dims = adapter_for(tiny_model("llama")).dims  # layer: 64*128 + 64*64 + 2*64*96 + 96*64 = 30720 weights
    assert dims.adapter_overhead("global") == 0
    assert dims.adapter_overhead("layer") == pytest.approx(4096 / 30720)
    assert dims.adapter_overhead("block") == pytest.approx(2 * 4096 / 30720)


def test_fold_warns_on_gain_included_rotations_and_keeps_dtype():
    model = tiny_model("llama").to(torch.bfloat16)
    rot = larosa.calibrate(model, random_windows(2, seed=5), signal="gain", progress=False)
    with pytest.warns(UserWarning, match="gain-free"):
        folded = fold(model, rot, 0.4)
    assert {p.dtype for p in folded.parameters()} == {torch.bfloat16}
    assert folded.config.larosa["scope"] == "global"  # the measured best default


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fold_keeps_the_model_on_its_device(calibrated):
    model, rot = calibrated[("llama", False)]
    folded = fold(copy.deepcopy(model).cuda(), rot, 0.4)
    assert {p.device.type for p in folded.parameters()} == {"cuda"}
