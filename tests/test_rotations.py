import copy

import pytest
import torch
from conftest import random_windows, relative_error, saved_tiny, tiny_model
from safetensors.torch import load_file

import larosa
from larosa.eval import perplexity_streamed
from larosa.models import load_lazy
from larosa.rotations import Rotations, pca_rotation


def test_pca_rotation_is_an_orthogonal_descending_eigenbasis():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 24, dtype=torch.float64, generator=g) @ torch.randn(24, 24, dtype=torch.float64, generator=g)
    xtx = x.T @ x
    q, ev = pca_rotation(xtx)
    q, ev = q.double(), ev.double()
    assert (q.T @ q - torch.eye(24, dtype=torch.float64)).abs().max() < 1e-6
    assert torch.all(ev[:-1] >= ev[1:])
    # Eigen-equation, with the error measured against the largest eigenvalue (q is stored in float32).
    assert ((xtx @ q - q * ev).abs().max() / ev[0]) < 1e-6


def _reference_second_moments(model, windows):
    """XᵀX of every site from ordinary full-model forwards: what layerwise calibration must reproduce.

    The gain-free signal is recomputed from the norm's input, independently of the gain division larosa uses.
    """
    acc, hooks = {}, []

    def add(key, x):
        x = x.double()
        acc[key] = acc.get(key, 0) + x.transpose(-1, -2) @ x

    for i, layer in enumerate(model.model.layers):
        for block, norm in (("attn", layer.input_layernorm), ("mlp", layer.post_attention_layernorm)):
            def hook(mod, args, out, i=i, block=block):
                add((i, block, "gain"), out.reshape(-1, out.shape[-1]))
                h = args[0].double()
                add((i, block, "gainfree"), (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon)
                                             ).reshape(-1, h.shape[-1]))
            hooks.append(norm.register_forward_hook(hook))

        def heads(mod, args, i=i):  # 4 query heads of 16 in 2 KV groups
            x = args[0].reshape(-1, 2, 2, 16).transpose(0, 1).reshape(2, -1, 16)
            add((i, "heads", None), x)
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(heads))
    with torch.no_grad():
        for w in windows:
            model(w[None])
    for h in hooks:
        h.remove()
    return acc


def _same_basis(q, xtx, eigvals):
    q_ref, ev_ref = pca_rotation(xtx)
    torch.testing.assert_close(eigvals, ev_ref, rtol=1e-4, atol=1e-3)
    eye = torch.eye(q.shape[-1], dtype=torch.float64).expand_as(q)
    assert (q.double().transpose(-1, -2) @ q.double() - eye).abs().max() < 1e-5
    # Same eigenbasis: Q_refᵀ Q is the identity wherever eigenvalues are well separated.
    torch.testing.assert_close(q_ref.double().transpose(-1, -2) @ q.double(), eye, atol=2e-3, rtol=0)


@pytest.mark.parametrize("signal", ["gain", "gainfree"])
def test_layerwise_calibration_matches_full_forward(model, signal):
    windows = random_windows()
    rot = larosa.calibrate(model, windows, signal=signal, device="cpu", progress=False)
    ref = _reference_second_moments(model, windows)
    assert rot.n_layers == 3 and rot.hidden_size == 64 and rot.signal == signal
    pooled = 0
    for i in range(3):
        for block in ("attn", "mlp"):
            xtx = ref[(i, block, signal)]
            pooled = pooled + xtx
            _same_basis(rot.q(f"layers.{i}.{block}"), xtx, rot.tensors[f"layers.{i}.{block}.eigvals"])
        assert rot.q(f"layers.{i}.heads").shape == (2, 16, 16)
        _same_basis(rot.q(f"layers.{i}.heads"), ref[(i, "heads", None)], rot.tensors[f"layers.{i}.heads.eigvals"])
    _same_basis(rot.q("global"), pooled, rot.tensors["global.eigvals"])
    assert rot.meta["tokens"] == str(windows.numel())


@pytest.mark.parametrize("signal", ["gain", "gainfree"])
def test_the_weighted_objective_diagonalises_the_row_weighted_moment(model, signal, tmp_path):
    """Weighted Q is the eigenbasis of diag(n) XᵀX diag(n), n the column norms of the weights that read the block's
    input (times |gain| where the signal leaves the gain out); a file without its norms is refused."""
    windows = random_windows()
    rot = larosa.calibrate(model, windows, signal=signal, objective="weighted", device="cpu", progress=False)
    ref = _reference_second_moments(model, windows)
    layer = model.model.layers[1]
    for block, linears, norm in (("attn", ("q_proj", "k_proj", "v_proj"), layer.input_layernorm),
                                 ("mlp", ("gate_proj", "up_proj"), layer.post_attention_layernorm)):
        parent = layer.self_attn if block == "attn" else layer.mlp
        n = torch.cat([getattr(parent, name).weight.detach().double() for name in linears]).norm(dim=0)
        if signal == "gainfree":
            n = n * norm.weight.detach().double().abs()
        torch.testing.assert_close(rot.tensors[f"layers.1.{block}.norms"].double(), n, rtol=1e-6, atol=0)
        weighted = ref[(1, block, signal)] * torch.outer(n, n)
        _same_basis(rot.q(f"layers.1.{block}"), weighted, rot.tensors[f"layers.1.{block}.eigvals"])
    del rot.tensors["layers.2.attn.norms"]
    rot.save(tmp_path / "bad.safetensors")
    with pytest.raises(larosa.LarosaError, match="lacks tensor 'layers.2.attn.norms'"):
        Rotations.load(tmp_path / "bad.safetensors")


def test_scopes_pick_the_documented_rotations():
    rot = larosa.calibrate(tiny_model("llama"), random_windows(), progress=False)
    for i, (a, m) in enumerate(rot.for_scope("block")):
        assert a is rot.q(f"layers.{i}.attn") and m is rot.q(f"layers.{i}.mlp")
    for i, (a, m) in enumerate(rot.for_scope("layer")):
        assert a is m is rot.q(f"layers.{i}.attn")
    assert all(a is m is rot.q("global") for a, m in rot.for_scope("global"))
    with pytest.raises(larosa.LarosaError, match="scope must be one of"):
        rot.for_scope("head")


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = tiny_model("qwen2")
    rot = larosa.calibrate(model, random_windows(), device="cpu", progress=False)
    rot.save(tmp_path / "r.safetensors")
    back = Rotations.load(tmp_path / "r.safetensors")
    assert back.meta == rot.meta and back.tensors.keys() == rot.tensors.keys()
    assert all(torch.equal(rot.tensors[k], back.tensors[k]) for k in rot.tensors)
    assert [p.name for p in tmp_path.iterdir()] == ["r.safetensors"]  # no temporary file left
    back.check_model(model)


@pytest.fixture
def saved(tmp_path):
    rot = larosa.calibrate(tiny_model("llama"), random_windows(), device="cpu", progress=False)
    rot.save(tmp_path / "r.safetensors")
    return tmp_path / "r.safetensors"


def test_rotations_for_another_architecture_are_refused(saved):
    rot = Rotations.load(saved)
    with pytest.raises(larosa.LarosaError, match="calibrate this model first"):
        rot.check_model(tiny_model("qwen2"))  # same dims, other family
    with pytest.raises(larosa.LarosaError, match="calibrate this model first"):
        larosa.sparsify(tiny_model("llama", vocab=128), larosa.LaRoSaConfig(rot, sparsity=0.4))  # other config


def test_rotations_from_other_weights_warn(saved):
    with pytest.warns(UserWarning, match="other weights"):
        Rotations.load(saved).check_model(tiny_model("llama", seed=5))


def test_missing_truncated_and_foreign_files_are_clear_errors(saved, tmp_path):
    with pytest.raises(larosa.LarosaError, match="not found"):
        Rotations.load(tmp_path / "nope.safetensors")
    data = saved.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(larosa.LarosaError, match="truncated or corrupted"):
        Rotations.load(tmp_path / "cut.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(larosa.LarosaError, match="not a larosa rotations file"):
        Rotations.load(tmp_path / "other.safetensors")


def test_non_orthogonal_rotation_is_refused(saved, tmp_path):
    rot = Rotations.load(saved)
    rot.tensors["layers.1.mlp"] = rot.tensors["layers.1.mlp"] * 1.01
    rot.save(tmp_path / "bad.safetensors")
    with pytest.raises(larosa.LarosaError, match="layers.1.mlp is not orthogonal"):
        Rotations.load(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("shards", ["one file", "sharded"])
def test_calibration_from_disk_equals_calibration_in_ram(tmp_path, shards):
    """load_lazy keeps every weight on disk (meta) and reads one layer at a time: the same rotations and the
    same fingerprint as the model held in RAM, and nothing stays resident afterwards."""
    path = saved_tiny(tmp_path / "m", "qwen2", "100KB" if shards == "sharded" else "1GB")
    assert (tmp_path / "m" / "model.safetensors.index.json").exists() == (shards == "sharded")
    windows = random_windows(3)
    eager, _ = larosa.load_model(path, device="cpu", dtype=torch.float32)
    lazy, _ = load_lazy(path)
    assert all(p.device.type == "meta" for p in lazy.parameters())
    for signal in ("gain", "gainfree"):
        a = larosa.calibrate(eager, windows, signal=signal, device="cpu", progress=False)
        b = larosa.calibrate(lazy, windows, signal=signal, device="cpu", progress=False)
        assert a.tensors.keys() == b.tensors.keys() and a.meta["weights_fingerprint"] == b.meta["weights_fingerprint"]
        for name in a.tensors:
            torch.testing.assert_close(b.tensors[name], a.tensors[name], rtol=1e-5, atol=1e-6)
    assert all(p.device.type == "meta" for p in lazy.parameters())
    assert all(b.device.type == "cpu" for b in lazy.buffers())


def test_lazy_loading_refuses_checkpoints_it_cannot_read(tmp_path):
    path = saved_tiny(tmp_path / "m")
    lazy, _ = load_lazy(path)
    del lazy.larosa_weights.weight_map["model.layers.1.mlp.down_proj.weight"]  # as a truncated index would
    with pytest.raises(larosa.LarosaError, match="no tensor 'model.layers.1.mlp.down_proj.weight'"):
        larosa.calibrate(lazy, random_windows(2), device="cpu", progress=False)
    weights = tmp_path / "m" / "model.safetensors"
    torch.save(load_file(weights), tmp_path / "m" / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(larosa.LarosaError, match="safetensors checkpoints only"):
        load_lazy(path)


@pytest.mark.parametrize("arch, tie", [("llama", False), ("qwen2", True)])
def test_streamed_perplexity_equals_the_whole_model_forward(tmp_path, arch, tie):
    """One layer resident at a time, in RAM or read from disk: the same PPL and measured sparsity as perplexity()
    on the whole model, dense and sparse (weight-aware scores on gain-free Q need the resident weights)."""
    path = saved_tiny(tmp_path / "m", arch, tie=tie)
    eager, _ = larosa.load_model(path, device="cpu", dtype=torch.float32)
    lazy, _ = load_lazy(path)
    assert eager.config.tie_word_embeddings == tie
    windows = random_windows(3)
    rot = larosa.calibrate(eager, random_windows(4, seed=5), signal="gainfree", device="cpu", progress=False)
    plan = [larosa.SparsityConfig(0.2, 0.3, 0.4, 0.5), larosa.SparsityConfig(0.5, 0.5, 0.5, 0.5),
            larosa.SparsityConfig(0.0, 0.1, 0.2, 0.3)]
    for sparsity, scope, score in [(None, "block", "magnitude"), (0.5, "block", "magnitude"),
                                   (plan, "global", "weight")]:
        config = None if sparsity is None else larosa.LaRoSaConfig(rot, sparsity=sparsity, scope=scope, score=score)
        if config is None:
            larosa.unsparsify(eager)
        else:
            larosa.sparsify(eager, config)
        want = larosa.perplexity(eager, windows, progress=False)
        for model in (eager, lazy):
            if model is eager:
                larosa.unsparsify(eager)
            got = perplexity_streamed(model, windows, config, device="cpu", progress=False)
            assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-5) and got["tokens"] == want["tokens"]
            assert got["measured_param_weighted"] == pytest.approx(want["measured_param_weighted"], abs=1e-9)
            assert got["site_sparsity"] == pytest.approx(want["site_sparsity"])
    assert all(p.device.type == "meta" for p in lazy.parameters())


def test_a_norm_gain_of_zero_calibrates_the_gain_free_signal_and_folds():
    """Real Gemma 3 270M has norm gains of exactly 0: the gain-free signal n(h) is taken from the norm's input
    (dividing the gained output by the gain cannot recover it) and is 0 where the gain is, as no weight reads it
    there; the input form folds that exactly as simulated, and every form is the dense model at sparsity 0."""
    from test_fold import folding

    from larosa.fold import fold

    model, windows = tiny_model("llama"), random_windows(2)
    model.model.layers[0].post_attention_layernorm.weight.data[3] = 0.0
    rot = larosa.calibrate(model, random_windows(4, seed=3), signal="gainfree", progress=False)
    q, eigvals = rot.tensors["layers.0.mlp"], rot.tensors["layers.0.mlp.eigvals"]
    assert eigvals[-1] < 1e-10 * eigvals[0] and q[3, -1].abs() > 1 - 1e-6  # coordinate 3: its own, empty axis
    with torch.no_grad():
        dense = model(windows).logits
        for form in ("residual", "input"):
            zero = fold(copy.deepcopy(model), folding(rot, 0.0, form=form))(windows).logits
            assert relative_error(zero, dense) < 1e-4, form
        simulated = larosa.sparsify(copy.deepcopy(model), larosa.LaRoSaConfig(rot, sparsity=0.5))(windows).logits
        folded = fold(copy.deepcopy(model), folding(rot, 0.5, scope="block", form="input"))(windows).logits
        assert torch.isfinite(simulated).all()
        assert relative_error(folded, simulated) < 1e-4
