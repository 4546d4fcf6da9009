import pytest

from larosa.arch import Dims
from larosa.bench.decode import byte_ideal_speedup
from larosa.sparsity import SparsityConfig

LLAMA2_7B = Dims(hidden=4096, intermediate=11008, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, vocab=32000)


@pytest.mark.parametrize("scope, s, ideal", [
    ("layer", 0.4, 1.39), ("layer", 0.5, 1.59), ("global", 0.4, 1.57), ("global", 0.5, 1.83)])
def test_byte_ideal_speedup_matches_the_documented_llama2_figures(scope, s, ideal):
    got = byte_ideal_speedup(LLAMA2_7B, SparsityConfig.from_nominal(s), scope, context=128)
    assert got == pytest.approx(ideal, abs=0.015)


def test_byte_ideal_speedup_is_one_when_dense_and_falls_with_adapters_and_context():
    cfg = SparsityConfig.from_nominal(0.4)
    assert byte_ideal_speedup(LLAMA2_7B, None, None, 128) == 1.0
    by_scope = [byte_ideal_speedup(LLAMA2_7B, cfg, scope, 128) for scope in ("global", "layer", "block")]
    assert by_scope == sorted(by_scope, reverse=True)
    assert byte_ideal_speedup(LLAMA2_7B, cfg, "layer", 4096) < byte_ideal_speedup(LLAMA2_7B, cfg, "layer", 128)


def _kernel_row(**kw):
    row = dict(model="llama2-7b", weight="qkv", d_in=4096, d_out=12288, s=0.5, k=2048, dense_us=26.8, threshold_us=2.0,
               sparse_us=16.0, speedup=26.8 / 16.0, sparse_GBps=3150.0, frac_of_ideal=26.8 / 16.0 / 2, gemv_us=14.0,
               unfused_us=19.0, select_v1_us=7.0, torch_topk_us=25.2, pdl_us=None)
    return {**row, **kw}


def test_kernels_table_lists_every_row_and_the_sweep_winners():
    from larosa.bench.kernels import kernels_table

    result = {"meta": dict(device="NVIDIA H200", torch="2.11", triton="3.6", copy_GBps=4242.3, launch_floor_us=0.71),
              "rows": [_kernel_row(), _kernel_row(weight="down", d_in=11008, d_out=4096, k=5504, pdl_us=17.5)],
              "tuning": [dict(kernel="fused", d_in=4096, d_out=12288, s=0.5, block_n=bn, block_k=16, per_sm=4, us=us)
                         for bn, us in ((1024, 16.1), (512, 15.2))]}
    table = kernels_table(result)
    lines = table.splitlines()
    assert "4242 GB/s" in lines[0]
    assert "| llama2-7b | qkv | 4096x12288 | 0.50 | 2048 | 26.8 | 2.0 | 16.0 | 1.68 | 3150 | 0.84 |" in table
    down = next(line for line in lines if "| down |" in line)
    assert down.count("|") == lines[2].count("|")  # every column, "-" where unmeasured
    assert "| 17.5 |" in table and "| - |" in table
    assert table.endswith("| 4096x12288 | 0.50 | block_n 512, block_k 16, 4 programs/SM | 15.2 |")  # the faster


def test_bench_decode_cli_rejects_bad_selections_before_needing_a_gpu(capsys):
    from larosa.cli import main

    assert main(["bench", "decode", "--select", "topk,greedy"]) == 2
    assert "unknown selection(s) greedy; choose from topk, threshold, teal" in capsys.readouterr().err
    assert main(["bench", "decode", "--model", "some-dir", "--select", "teal"]) == 2
    assert "random weights" in capsys.readouterr().err


def test_bench_kernels_cli_rejects_bad_arguments_before_needing_a_gpu(capsys):
    from larosa.cli import main

    assert main(["bench", "kernels", "--only", "gpt2"]) == 2
    assert "matches no shape" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "kernels", "--sparsity", "0.5,1.0"])
    assert "[0, 1)" in capsys.readouterr().err
