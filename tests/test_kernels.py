"""Top-K selection and gather-GEMV kernels against torch references. Without CUDA they run under the Triton
interpreter (conftest switches it on before triton is imported); without triton they skip."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from larosa import kernels as K

CUDA = torch.cuda.is_available()
HAVE_TRITON, MAX_D_IN = K.HAVE_TRITON, K.MAX_D_IN
select_topk, sparse_gemv, topk_gemv = K.select_topk, K.sparse_gemv, K.topk_gemv
pack_input_major, split_output = K.pack_input_major, K.split_output
sparse_gemv_reference, topk_gemv_reference = K.sparse_gemv_reference, K.topk_gemv_reference

DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not CUDA, reason="large shapes run on a GPU only")
SHAPES = [(100, 77), (576, 1536), (1536, 576)]  # (d_in, d_out), none a multiple of every block size


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def distinct(n: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """n values of distinct magnitudes (no ties anywhere), random signs, in random order."""
    perm = torch.randperm(n, generator=g)
    if dtype == torch.float32:
        mags = (perm + 1).float() * 0.01
    else:  # consecutive bit patterns from about 2**-7 upwards: n distinct 16-bit floats
        base = 0x3C00 if dtype == torch.bfloat16 else 0x2000
        mags = (perm + base).to(torch.int16).view(dtype)
    signs = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    return (mags * signs.to(dtype)).to(DEVICE)


def check_selection(x: torch.Tensor, k: int, idx: torch.Tensor, vals: torch.Tensor) -> None:
    """Exactly k distinct positions, ascending, their values, and no dropped magnitude above a kept one."""
    assert idx.dtype == torch.int32 and idx.shape == (k,) and vals.shape == (k,) and vals.dtype == x.dtype
    i = idx.long()
    assert bool((i >= 0).all()) and bool((i < x.numel()).all())
    assert bool((i[1:] > i[:-1]).all())  # ascending, hence distinct
    assert torch.equal(vals, x[i])
    best = torch.topk(x.float().abs(), k).values.sort().values
    assert torch.equal(vals.float().abs().sort().values, best)


# ---------------------------------------------------------------------------------------------- selection
@needs_triton
@pytest.mark.parametrize("radix", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d_in", [100, 576, 1536])
def test_select_is_torch_topk_without_ties(d_in, dtype, radix):
    g = gen(d_in * 7 + radix)
    for k in (1, d_in // 3, d_in - 1, d_in):
        x = distinct(d_in, dtype, g)
        idx, vals = select_topk(x, k, radix=radix)
        check_selection(x, k, idx, vals)
        want = torch.topk(x.float().abs(), k).indices.sort().values
        assert torch.equal(idx.long(), want)


@needs_triton
@pytest.mark.parametrize("radix", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_select_exactly_k_with_heavy_ties_and_zeros(dtype, radix):
    g = gen(11 + radix)
    for d_in in (1, 7, 100, 576):
        x = torch.randint(-3, 4, (d_in,), generator=g).to(dtype).to(DEVICE)  # about 1/7 zeros, rest 3 values
        x[0] = -0.0
        for k in sorted({1, max(1, d_in // 7), d_in // 2 or 1, d_in}):
            idx, vals = select_topk(x, k, radix=radix)
            check_selection(x, k, idx, vals)
            # ties at the threshold go to the lowest indices
            t = vals.float().abs().min()
            tied = (x.float().abs() == t).nonzero().flatten()
            kept_tied = idx.long()[vals.float().abs() == t]
            assert torch.equal(kept_tied, tied[: kept_tied.numel()])
    zeros = torch.zeros(300, dtype=dtype, device=DEVICE)
    for k in (1, 150, 300):
        idx, _ = select_topk(zeros, k, radix=radix)
        assert torch.equal(idx.long().cpu(), torch.arange(k))


@needs_triton
@pytest.mark.parametrize("d_in", [11008, 14336, 28672, MAX_D_IN])
def test_select_at_down_proj_widths(d_in):
    g = gen(d_in)
    x = torch.randn(d_in, generator=g).to(torch.bfloat16).to(DEVICE)  # bf16: ties are common at this size
    for k in (1, round(0.6 * d_in), d_in):
        check_selection(x, k, *select_topk(x, k))


@needs_triton
def test_select_extreme_magnitudes():
    for dtype in [torch.bfloat16, torch.float16, torch.float32]:
        info = torch.finfo(dtype)
        x = torch.tensor([0.0, info.max, -info.max, info.tiny, -info.smallest_normal / 4, 1.0, -0.0, -1.0], dtype=dtype)
        x = x.to(DEVICE)
        for k in range(1, x.numel() + 1):
            check_selection(x, k, *select_topk(x, k))


# ---------------------------------------------------------------------------------------------- gather-GEMV
def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def random_selection(d_in: int, k: int, g: torch.Generator, dtype=torch.bfloat16):
    idx = torch.randperm(d_in, generator=g)[:k].sort().values.to(torch.int32).to(DEVICE)
    vals = torch.randn(k, generator=g).to(dtype).to(DEVICE)
    return idx, vals


@needs_triton
@pytest.mark.parametrize("d_in,d_out", SHAPES)
def test_sparse_gemv_matches_reference_and_writes_every_output(d_in, d_out):
    g = gen(d_in + d_out)
    wt = torch.randn(d_in, d_out, generator=g).to(torch.bfloat16).to(DEVICE)
    for k in (1, d_in // 2 + 3, d_in):
        idx, vals = random_selection(d_in, k, g)
        out = torch.full((d_out,), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        y = sparse_gemv(idx, vals, wt, out=out)
        assert y is out and bool(torch.isfinite(out).all())
        assert rel_err(y, sparse_gemv_reference(idx, vals, wt)) < 1e-2


@needs_triton
@pytest.mark.parametrize(
    "cfg",
    [
        dict(split_k=1),  # the GEMV kernel stores the output itself
        dict(split_k=5, block_k=16),  # fp32 partials plus the summing kernel
        dict(block_n=16, block_k=8, split_k=3),
        dict(block_n=512, block_k=64, num_warps=8),
        dict(block_k=8, split_k=70),  # 38 splits: the summing kernel takes them 32 at a time
    ],
    ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()),
)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_sparse_gemv_launch_configs(cfg, out_dtype):
    d_in, d_out = 300, 200
    g = gen(len(str(cfg)))
    wt = torch.randn(d_in, d_out, generator=g).to(torch.bfloat16).to(DEVICE)
    for k in (1, 130, 300):
        idx, vals = random_selection(d_in, k, g)
        out = torch.full((d_out,), float("nan"), dtype=out_dtype, device=DEVICE)
        sparse_gemv(idx, vals, wt, out=out, **cfg)
        assert bool(torch.isfinite(out).all())
        assert rel_err(out, sparse_gemv_reference(idx, vals, wt)) < 1e-2


@needs_triton
@pytest.mark.parametrize("w_dtype", [torch.float16, torch.float32])
def test_sparse_gemv_other_weight_dtypes(w_dtype):
    g = gen(5)
    wt = torch.randn(200, 150, generator=g).to(w_dtype).to(DEVICE)
    idx, vals = random_selection(200, 90, g, dtype=w_dtype)
    y = sparse_gemv(idx, vals, wt)
    assert y.dtype == w_dtype and rel_err(y, sparse_gemv_reference(idx, vals, wt)) < 1e-2


@needs_triton
def test_sparse_gemv_reads_rows_of_a_wider_packed_weight():
    """A column slice of a packed weight (row stride > d_out) is a valid input-major weight."""
    g = gen(9)
    packed = torch.randn(64, 96, generator=g).to(torch.bfloat16).to(DEVICE)
    part = packed[:, 32:80]
    idx, vals = random_selection(64, 20, g)
    assert rel_err(sparse_gemv(idx, vals, part), sparse_gemv_reference(idx, vals, part.contiguous())) < 1e-2


@needs_triton
def test_down_proj_width_gemv():
    g = gen(3)
    d_in, d_out, k = 14336, 48, 5000
    x = distinct(d_in, torch.float32, g)  # fp32: distinct magnitudes at this width
    wt = torch.randn(d_in, d_out, generator=g).to(torch.bfloat16).to(DEVICE)
    assert rel_err(topk_gemv(x, wt, k), topk_gemv_reference(x, wt, k)) < 1e-2


# ---------------------------------------------------------------------------------------------- end to end
@needs_triton
@pytest.mark.parametrize("d_in,d_out", SHAPES)
def test_topk_gemv_end_to_end(d_in, d_out):
    g = gen(d_in * d_out)
    wt = torch.randn(d_in, d_out, generator=g).to(torch.bfloat16).to(DEVICE)
    for k in (1, (2 * d_in) // 5, d_in):
        x = distinct(d_in, torch.bfloat16, g)
        y = topk_gemv(x.unsqueeze(0), wt, k)  # the [1, d_in] decode shape
        assert y.shape == (1, d_out) and y.dtype == torch.bfloat16
        assert rel_err(y[0], topk_gemv_reference(x, wt, k)) < 1e-2


@needs_triton
def test_packed_qkv_is_three_sparse_linears():
    g = gen(21)
    torch.manual_seed(21)
    d_in = 96
    q, kp, v = (nn.Linear(d_in, n, bias=False, dtype=torch.bfloat16, device=DEVICE) for n in (96, 32, 32))
    wt = pack_input_major([q, kp, v])
    assert wt.shape == (d_in, 160) and wt.is_contiguous()
    x = distinct(d_in, torch.bfloat16, g)
    k = 40
    ys = split_output(topk_gemv(x, wt, k), [q, kp, v])
    keep = torch.zeros(d_in, dtype=torch.bool, device=DEVICE)
    keep[torch.topk(x.float().abs(), k).indices] = True
    xs = torch.where(keep, x, torch.zeros_like(x)).float()
    for y, lin in zip(ys, (q, kp, v)):
        assert rel_err(y, xs @ lin.weight.detach().float().T) < 1e-2
    assert [y.shape[0] for y in split_output(torch.zeros(160), [96, 32, 32])] == [96, 32, 32]


# ---------------------------------------------------------------------------------------------- arguments
@needs_triton
def test_bad_arguments_fail_clearly():
    x = torch.randn(64, device=DEVICE).bfloat16()
    wt = torch.randn(64, 32, device=DEVICE).bfloat16()
    with pytest.raises(ValueError, match="k must be in 1..d_in"):
        select_topk(x, 0)
    with pytest.raises(ValueError, match="k must be in 1..d_in"):
        topk_gemv(x, wt, 65)
    with pytest.raises(TypeError, match="k must be an int"):
        select_topk(x, 3.0)
    with pytest.raises(ValueError, match="batch 1"):
        select_topk(torch.randn(2, 64, device=DEVICE), 3)
    with pytest.raises(TypeError, match="bfloat16, float16 or float32"):
        select_topk(torch.arange(64, device=DEVICE), 3)
    with pytest.raises(ValueError, match=f"d_in <= {MAX_D_IN}"):
        select_topk(torch.randn(MAX_D_IN + 1, device=DEVICE), 3)
    with pytest.raises(ValueError, match="input-major"):
        topk_gemv(x, torch.randn(32, 64, device=DEVICE).bfloat16().T, 3)  # W.T without .contiguous()
    with pytest.raises(ValueError, match="has 64 entries but wt has d_in=32"):
        topk_gemv(x, torch.randn(32, 64, device=DEVICE).bfloat16(), 3)
    idx, vals = select_topk(x, 5)
    with pytest.raises(ValueError, match="int32"):
        sparse_gemv(idx.long(), vals, wt)
    with pytest.raises(ValueError, match="same length"):
        sparse_gemv(idx, vals[:4], wt)
    with pytest.raises(ValueError, match="out must be"):
        sparse_gemv(idx, vals, wt, out=torch.empty(31, device=DEVICE))
    with pytest.raises(ValueError, match="powers of two"):
        sparse_gemv(idx, vals, wt, block_n=48)
    with pytest.raises(ValueError, match="radix"):
        select_topk(x, 3, radix=3)
    with pytest.raises(ValueError, match="with one d_in"):
        pack_input_major([torch.zeros(4, 8), torch.zeros(4, 9)])
    if CUDA:
        with pytest.raises(ValueError, match="one device"):
            sparse_gemv(idx, vals, wt.cpu())


def test_imports_and_torch_helpers_work_without_triton(monkeypatch):
    """The package must import on machines without Triton; only calling a kernel needs it."""
    path = Path(__file__).resolve().parents[1] / "src" / "larosa" / "kernels" / "topk_gemv.py"
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    spec = importlib.util.spec_from_file_location("topk_gemv_without_triton", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert not mod.HAVE_TRITON
    w = torch.randn(8, 6)
    wt = mod.pack_input_major([w, 2 * w])
    assert torch.equal(wt, torch.cat([w.T, 2 * w.T], 1))
    x = torch.tensor([0.0, 3.0, -5.0, 1.0, 0.5, 2.0])
    assert torch.allclose(mod.topk_gemv_reference(x, wt, 2), x[[1, 2]] @ wt[[1, 2]])
    with pytest.raises(RuntimeError, match="needs Triton"):
        mod.select_topk(x, 2)


# ---------------------------------------------------------------------------------------------- GPU only
@needs_cuda
@needs_triton
@pytest.mark.parametrize("d_in,d_out", [(4096, 12288), (14336, 4096), (4096, 28672)])
def test_large_shapes_on_gpu(d_in, d_out):
    g = gen(d_in + 3 * d_out)
    wt = torch.randn(d_in, d_out, generator=g).to(torch.bfloat16).to(DEVICE)
    x = torch.randn(d_in, generator=g).to(torch.bfloat16).to(DEVICE)
    for s in (0.25, 0.5, 0.7):
        k = round((1 - s) * d_in)
        idx, vals = select_topk(x, k)
        check_selection(x, k, idx, vals)
        out = torch.full((d_out,), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        sparse_gemv(idx, vals, wt, out=out)
        assert bool(torch.isfinite(out).all())
        assert rel_err(out, sparse_gemv_reference(idx, vals, wt)) < 1e-2


# ---------------------------------------------------------------------------------------------- v2 paths
def workspaces_clean() -> bool:
    return K.workspaces_clean(torch.device(DEVICE))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d_in", [1, 7, 1023, 1025, 3000])
def test_hist_select_same_set_as_topk_and_exact_k_with_ties(d_in, dtype):
    g = gen(d_in + 17)
    for k in sorted({1, max(1, d_in // 3), d_in}):
        x = distinct(d_in, dtype, g)  # no ties: torch.topk's set exactly
        idx, vals = select_topk(x, k, method="hist")
        check_selection(x, k, idx, vals)
        assert torch.equal(idx.long(), torch.topk(x.float().abs(), k).indices.sort().values)
        xt = torch.randint(-3, 4, (d_in,), generator=g).to(dtype).to(DEVICE)  # heavy ties and zeros
        idx, vals = select_topk(xt, k, method="hist")
        check_selection(xt, k, idx, vals)
        t = vals.float().abs().min()
        tied = (xt.float().abs() == t).nonzero().flatten()
        kept = idx.long()[vals.float().abs() == t]
        assert torch.equal(kept, tied[: kept.numel()])  # lowest indices first
        assert workspaces_clean()


@needs_triton
@pytest.mark.parametrize("d_in,d_out", [(1, 5), (100, 77), (1500, 1100), (2049, 40)])
@pytest.mark.parametrize("cfg", [{}, dict(split_k=1), dict(split_k=9, block_k=4), dict(block_n=64, block_k=32)],
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()) or "default")
def test_fused_topk_gemv_poisoned_output_and_ties(d_in, d_out, cfg):
    g = gen(d_in * 3 + d_out + len(cfg))
    wt = torch.randn(d_in, d_out, generator=g).to(torch.bfloat16).to(DEVICE)
    for k in sorted({1, max(1, d_in // 2), d_in}):
        for x in (torch.randn(d_in, generator=g).to(torch.bfloat16).to(DEVICE),
                  torch.randint(-2, 3, (d_in,), generator=g).to(torch.bfloat16).to(DEVICE)):  # ties
            out = torch.full((d_out,), float("nan"), dtype=torch.bfloat16, device=DEVICE)
            y = topk_gemv(x, wt, k, out=out, fused=True, **cfg)
            assert y is out and bool(torch.isfinite(out).all())
            idx, vals = select_topk(x, k, method="single")  # the same set (ties: lowest index first)
            ref = sparse_gemv_reference(idx, vals, wt)
            if float(ref.norm()) > 0:
                assert rel_err(out, ref) < 1e-2
            else:
                assert float(out.float().abs().max()) == 0
            assert workspaces_clean()


@needs_triton
def test_fused_and_unfused_agree_at_down_proj_width():
    g = gen(77)
    d_in, d_out = 11008, 24
    wt = torch.randn(d_in, d_out, generator=g).to(torch.bfloat16).to(DEVICE)
    x = torch.randn(d_in, generator=g).to(torch.bfloat16).to(DEVICE)  # bf16 at this width: ties at t
    for k in (round(0.6 * d_in), round(0.3 * d_in)):
        idx, vals = select_topk(x, k)
        check_selection(x, k, idx, vals)
        ref = sparse_gemv_reference(idx, vals, wt)
        assert rel_err(topk_gemv(x, wt, k, fused=True), ref) < 1e-2
        assert rel_err(topk_gemv(x, wt, k, fused=False), ref) < 1e-2
        assert workspaces_clean()


@needs_triton
def test_method_argument_checks():
    with pytest.raises(ValueError, match="method"):
        select_topk(torch.randn(64, device=DEVICE), 3, method="hist")  # fp32 has 31 bits: single only
    with pytest.raises(TypeError, match="unknown GEMV option"):
        topk_gemv(torch.randn(64, device=DEVICE).bfloat16(), torch.randn(64, 8, device=DEVICE).bfloat16(), 3,
                  fused=True, block_m=4)


@needs_triton
def test_pdl_gives_the_same_result_or_is_refused():
    """PDL only changes when the kernels' programs start: the output must be bitwise the plain launch's. Where
    the device cannot (CPU, the interpreter, pre-Hopper GPUs) pdl=True is a clear error, and the engine does not
    ask for it."""
    g = gen(91)
    d_in, d_out = 4096, 1000
    wt = torch.randn(d_in, d_out, generator=g).to(torch.bfloat16).to(DEVICE)
    x = torch.randn(d_in, generator=g).to(torch.bfloat16).to(DEVICE)
    k = d_in // 2
    if not K.pdl_supported(wt.device):
        with pytest.raises(RuntimeError, match="pdl needs"):
            topk_gemv(x, wt, k, fused=True, pdl=True)
        assert workspaces_clean()  # refused before anything launched
        return
    plain = topk_gemv(x, wt, k, fused=True)
    assert torch.equal(topk_gemv(x, wt, k, fused=True, pdl=True), plain)
    assert rel_err(plain, topk_gemv_reference(x, wt, k)) < 1e-2
    assert workspaces_clean()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d_in,d_out", [(1, 5), (100, 77), (1500, 1100)])
def test_threshold_gemv_keeps_every_entry_at_or_above_the_threshold(d_in, d_out, dtype):
    """One launch with a calibrated threshold: the product of exactly the entries with |x| >= t (t rounded to
    x's dtype), ties and zeros included; and it leaves the workspaces as it found them."""
    g = gen(d_in + d_out)
    wt = torch.randn(d_in, d_out, generator=g).to(dtype).to(DEVICE)
    for x in (torch.randn(d_in, generator=g).to(dtype).to(DEVICE),
              torch.randint(-3, 4, (d_in,), generator=g).to(dtype).to(DEVICE)):  # ties at t, zeros
        for threshold in (0.0, 1.0, float(x.float().abs().median()), float(x.float().abs().max()) + 1):
            state = K.threshold_state(threshold, dtype, DEVICE)
            out = torch.full((d_out,), float("nan"), dtype=dtype, device=DEVICE)
            assert K.threshold_gemv(x, wt, state, out=out) is out and bool(torch.isfinite(out).all())
            t = torch.tensor(threshold).to(dtype).float()
            kept = x.float().abs() >= t
            ref = torch.where(kept, x.float(), 0.0) @ wt.float()
            if float(ref.norm()) > 0:
                assert rel_err(out, ref) < 1e-2
            else:
                assert float(out.float().abs().max()) == 0  # nothing kept: nothing read
            assert workspaces_clean()
    with pytest.raises(TypeError, match="bf16 or fp16"):
        K.threshold_state(0.5, torch.float32, DEVICE)
    with pytest.raises(ValueError, match=">= 0"):
        K.threshold_state(float("nan"), dtype, DEVICE)


@needs_triton
@pytest.mark.parametrize("widths", [(40, 16, 24), (1104,), (304, 696), (11, 5, 7)])
def test_threshold_gemv_per_column_keeps_each_weights_own_entries(widths):
    """TEAL's thresholds on q | k | v (gate | up) packed side by side: each output column sums the entries at or
    above its own weight's threshold, segment borders inside a column block included."""
    g = gen(sum(widths))
    d_in, d_out = 257, sum(widths)
    wt = torch.randn(d_in, d_out, generator=g).to(torch.bfloat16).to(DEVICE)
    x = torch.randn(d_in, generator=g).to(torch.bfloat16).to(DEVICE)
    levels = [float(x.float().abs().quantile(q)) for q in (0.2, 0.6, 0.9)[:len(widths)]]
    state = K.column_thresholds(list(zip(levels, widths)), torch.bfloat16, DEVICE)
    assert state.shape == (d_out,)
    for cfg in ({}, dict(block_n=64, split_k=3)):
        out = torch.full((d_out,), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        assert K.threshold_gemv(x, wt, state, out=out, per_column=True, **cfg) is out
        ref = torch.cat([torch.where(x.float().abs() >= torch.tensor(t).bfloat16().float(), x.float(), 0.0)
                         @ part.float() for t, part in zip(levels, wt.split(list(widths), dim=1))])
        assert rel_err(out, ref) < 1e-2
        assert workspaces_clean()
    with pytest.raises(ValueError, match="column_thresholds"):
        K.threshold_gemv(x, wt, K.threshold_state(0.5, torch.bfloat16, DEVICE), per_column=True)
    with pytest.raises(ValueError, match="threshold_state"):
        K.threshold_gemv(x, wt, torch.zeros(5, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="width >= 1"):
        K.column_thresholds([(0.5, 40), (0.5, 0)], torch.bfloat16, DEVICE)


@needs_triton
def test_the_kernels_are_custom_ops_that_compile_into_one_graph():
    """The engine calls the kernels as torch custom ops, so torch.compile keeps the decode step one graph: a
    graph break here would split it per projection (and recompile per input width)."""
    from larosa.runtime import ops

    g = gen(5)
    d_in, d_out = 300, 130
    wt = torch.randn(d_in, d_out, generator=g).to(torch.bfloat16).to(DEVICE)
    x = torch.randn(d_in, generator=g).to(torch.bfloat16).to(DEVICE)
    state = K.threshold_state(0.7, torch.bfloat16, DEVICE)

    def step(x):
        return ops.topk_gemv(x, wt, 150, False) + ops.threshold_gemv(x, wt, state, False)

    compiled = torch.compile(step, fullgraph=True, backend="eager")  # fullgraph: a graph break is an error
    want = K.topk_gemv(x, wt, 150) + K.threshold_gemv(x, wt, state)
    assert torch.equal(compiled(x), want) and torch.equal(step(x), want)
    assert workspaces_clean()
