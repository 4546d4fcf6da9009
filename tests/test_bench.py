import pytest

from larosa.adapters import Dims
from larosa.bench import byte_ideal_speedup
from larosa.sparsify import SparsityConfig

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
