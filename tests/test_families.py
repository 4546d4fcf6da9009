"""Every supported family beyond Llama and Qwen2, on tiny random configs built here: what the issue of more families
asks of each (Mistral: a sliding window; Qwen3: per-head QK-norm; Gemma 3: norms on the blocks' outputs, (1 + w)
gains, a scaled embedding, GeGLU, windowed and global layers with their own rotary tables, a logit soft cap;
Phi-3: fused q|k|v and gate|up weights, a partial rotary embedding, longrope)."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import (decodes_as_hf, generates_as_hf, graph_decodes_as_hf, loads_bit_exact, random_windows,
                      relative_error, tiny_config, tiny_model)
from transformers import AutoModelForCausalLM, Phi3Config

import larosa
from larosa import LaRoSaConfig
from larosa.runtime import Transformer
from larosa.sparsity import sites

FAMILIES = ["mistral", "qwen3", "gemma3", "phi3"]
# The folded forms each family allows: Gemma 3's gained norms on its blocks' outputs leave no rotatable residual.
FORMS = {"mistral": ("residual", "input"), "qwen3": ("residual", "input"), "gemma3": ("input",),
         "phi3": ("residual", "input")}


@pytest.fixture(params=FAMILIES)
def family(request):
    model = tiny_model(request.param)
    return request.param, model, larosa.calibrate(model, random_windows(4, seed=3), signal="gainfree", progress=False)


def test_sparsity_zero_is_the_dense_model_simulated_and_in_every_folded_form(family):
    arch, model, rot = family
    windows = random_windows(2)
    with torch.no_grad():
        dense = model(windows).logits
        for scope in ("block", "layer", "global"):
            simulated = larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(rot, sparsity=0.0, scope=scope))
            assert relative_error(simulated(windows).logits, dense) < 1e-5
            for form in FORMS[arch]:
                folded = larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(
                    rot, sparsity=0.0, scope=scope, mode="folded", form=form, head_rotation=True))
                assert relative_error(folded(windows).logits, dense) < 1e-4, (scope, form)


def distinct_windows(n: int, seq_len: int = 32, vocab: int = 96) -> torch.Tensor:
    """Windows in which no token repeats. Where every key a query sees holds one token, the query heads of a KV group
    output the same values: exact ties in o_proj's Top-K, which float rounding breaks either way (Gemma 3's folded
    input form and simulate mode did on a window opening with a repeated token)."""
    g = torch.Generator().manual_seed(1)
    return torch.stack([torch.randperm(vocab, generator=g)[:seq_len] for _ in range(n)])


@pytest.mark.parametrize("scope", ["global", "block"])
def test_folded_equals_simulate_and_loads_bit_exact(family, scope, tmp_path):
    arch, model, rot = family
    windows = distinct_windows(2)
    simulated = larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(rot, sparsity=0.5, scope=scope))
    with torch.no_grad():
        dense, b = model(windows).logits, simulated(windows).logits
    assert relative_error(b, dense) > 1e-2
    for form in FORMS[arch]:
        folded = larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(rot, sparsity=0.5, scope=scope, mode="folded",
                                                                    form=form))
        with torch.no_grad():
            assert relative_error(folded(windows).logits, b) < 1e-4, form
        loads_bit_exact(folded, tmp_path / form, windows)


def test_gemma3_folds_the_gain_included_signal_as_simulated():
    """The input form's transform diag(1 + w) Q keeps Gemma's gain where the gain-included Q expects it."""
    model, windows = tiny_model("gemma3"), distinct_windows(2)
    rot = larosa.calibrate(model, random_windows(4, seed=3), signal="gain", progress=False)
    simulated = larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(rot, sparsity=0.5, scope="layer"))
    folded = larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(rot, sparsity=0.5, scope="layer", mode="folded",
                                                                form="input"))
    with torch.no_grad():
        assert relative_error(folded(windows).logits, simulated(windows).logits) < 1e-4


def test_the_engine_generates_what_transformers_generates(family):
    """18 positions: past Gemma 3's window of 8, so its windowed layers must drop the oldest keys."""
    arch, model, rot = family
    folded = larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(rot, sparsity=0.4, mode="folded",
                                                                form=FORMS[arch][0]))
    for hf in (model, folded):
        generates_as_hf(hf)
        decodes_as_hf(hf, 1e-5)  # and its logits, prefill and decode


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("select", ["topk", "threshold"])
def test_the_kernels_decode_the_family_in_the_cuda_graph_as_transformers(family, select):
    """On the GPU, bf16: the folded family at 50 % through the Triton kernels inside the CUDA graph, 20 positions
    (past Gemma 3's window of 8), against transformers' own forward of the same folded model."""
    arch, model, rot = family
    calib = {"calib": random_windows(4, seed=5)} if select == "threshold" else {}
    folded = larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(rot, sparsity=0.5, mode="folded",
                                                                form=FORMS[arch][0], select=select, **calib))
    engine = graph_decodes_as_hf(folded.cuda().to(torch.bfloat16), 5e-2)
    assert engine.model.layers[0].qkv.input_major


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_the_engine_attends_through_the_sliding_window(arch):
    """20 positions through a window of 8 decode as transformers does; an engine that saw every key would not."""
    model = tiny_model(arch)
    model.config.sliding_window = 64  # transformers reads the window when it builds the masks
    unwindowed = Transformer.from_hf(model, max_seq=32)
    model.config.sliding_window = 8
    decodes_as_hf(model, 1e-5)
    tokens = random_windows(1, seq_len=20)[0]
    with torch.no_grad():
        assert relative_error(unwindowed(tokens, torch.arange(20)), model(tokens[None]).logits[0]) > 1e-3


def test_the_engine_norms_round_as_gemma3s_in_bfloat16():
    """Gemma multiplies by its gain 1 + w in float32 before casting back (Llama casts first): bit for bit."""
    model = tiny_model("gemma3").to(torch.bfloat16)
    engine = Transformer.from_hf(model, max_seq=8)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 3
    layer = model.model.layers[1]
    pairs = [(engine.layers[1].attn_norm, layer.input_layernorm), (engine.layers[1].mlp_out_norm,
             layer.post_feedforward_layernorm), (engine.final_norm, model.model.norm)]
    assert all(torch.equal(mine(x), theirs(x)) for mine, theirs in pairs)


def test_gemma3_refuses_what_it_cannot_compute_in_one_line():
    """The residual form (its output norms leave no rotatable residual) and, in the engine, attention beyond a
    windowed causal softmax (config options Gemma 3 checkpoints leave off)."""
    model = tiny_model("gemma3")
    rot = larosa.calibrate(model, random_windows(2, seed=3), signal="gainfree", progress=False)
    with pytest.raises(larosa.LarosaError, match=r"residual form cannot fold it: .*--form input") as refused:
        larosa.sparsify(copy.deepcopy(model), LaRoSaConfig(rot, sparsity=0.5, mode="folded", form="residual"))
    assert "\n" not in str(refused.value)
    model.config.attn_logit_softcapping = 50.0
    with pytest.raises(larosa.LarosaError, match="soft cap on the attention logits"):
        Transformer.from_hf(model, max_seq=32)


def test_gemma3_through_the_cli_lazy_calibration_streamed_fold_perplexity_and_generate(tmp_path, capsys,
                                                                                      monkeypatch):
    from conftest import TEXT, saved_tiny
    from test_cli import run

    import larosa.cli

    text, rot, folded = tmp_path / "text.txt", tmp_path / "rot.safetensors", tmp_path / "folded"
    text.write_text(TEXT, encoding="utf-8")
    model_dir = saved_tiny(tmp_path / "gemma3", "gemma3")
    code, _, _ = run(capsys, "calibrate", model_dir, "--data", text, "--out", rot, "--windows", 4, "--seq-len", 32,
                     "--signal", "gainfree", "--device", "cpu", "--lazy", "--quiet")
    assert code == 0
    sparsify = ("sparsify", model_dir, "--rotations", rot, "--sparsity", 0.4, "--out", folded, "--lazy", "--quiet")
    with monkeypatch.context() as patched:  # the residual form, asked for: refused before the model loads
        patched.setattr(larosa.cli, "load_lazy", None)
        code, _, err = run(capsys, *sparsify, "--form", "residual")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--form input" in err and not folded.exists()
    assert run(capsys, *sparsify)[0] == 0  # by default, the input form
    assert json.loads((folded / "config.json").read_text())["larosa"]["form"] == "input"
    ppl = ("eval", "ppl", "--data", text, "--seq-len", 32, "--windows", 2, "--json", "--quiet")
    code, out, _ = run(capsys, *ppl[:2], folded, *ppl[2:])
    code_simulated, out_simulated, _ = run(capsys, *ppl[:2], model_dir, *ppl[2:], "--rotations", rot, "--sparsity",
                                           0.4, "--scope", "global", "--lazy", "--device", "cpu")
    assert code == code_simulated == 0
    assert json.loads(out)["ppl"] == pytest.approx(json.loads(out_simulated)["ppl"], rel=1e-4)
    prompt = "The rotation concentrates the signal of each layer"  # longer than the window of 8, with the tokens
    code, out, _ = run(capsys, "generate", folded, "--prompt", prompt, "--max-new-tokens", 12, "--json", "--quiet",
                       "--dtype", "float32", "--device", "cpu")
    loaded, tok = larosa.load_model(str(folded), device="cpu", dtype=torch.float32)
    ids = torch.tensor(tok(prompt)["input_ids"])
    ref = loaded.generate(ids[None], max_new_tokens=12, do_sample=False, pad_token_id=0)[0, ids.numel():].tolist()
    assert code == 0 and json.loads(out)["tokens"] == ref


def test_phi3_longrope_decodes_as_transformers_within_the_original_context_and_is_refused_past_it():
    config = tiny_config("phi3")
    rope = {**config.rope_parameters, "rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0],
            "long_factor": [2.0, 4.0, 8.0, 16.0]}  # 4 factors: 8 rotated dims a head
    config = Phi3Config(**{**config.to_dict(), "rope_parameters": rope, "original_max_position_embeddings": 32})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    generates_as_hf(model, max_seq=32, new_tokens=20)
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
    _, model, rot = family
    calib = random_windows(4, seed=5)
    for config, target in ((larosa.TealConfig(0.4, calib, greedy=True, step=0.1), 0.4),
                           (larosa.CatsConfig(0.2, calib), 0.2)):
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
