"""Real SmolLM2-135M-Instruct (from the PyPI wheel) on a few hundred tokens of the project's shared text."""

import hashlib

import pytest
from conftest import SHARED_DATA

import larosa
from larosa import assets

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data beside the checkout"),
]


def test_builtin_wiki_text_is_the_shared_calibration_text():
    shared = (SHARED_DATA / "calib-wikipedia.txt").read_bytes()
    assert hashlib.sha256(larosa.data.load_text("builtin:wiki").encode()).digest() == hashlib.sha256(shared).digest()


def test_smollm2_dense_is_sane_and_sparse_ppl_rises_with_sparsity():
    model, tok = larosa.load_model("builtin:smollm2", device="cpu")
    assert assets.smollm2_dir().joinpath("model.safetensors").exists()
    calib = larosa.token_windows(tok, str(SHARED_DATA / "calib-wikipedia.txt"), 4, 256)
    rot = larosa.calibrate(model, calib, progress=False)
    windows = larosa.token_windows(tok, str(SHARED_DATA / "wikitext-2-raw-test.txt"), 2, 256)
    dense = larosa.perplexity(model, windows, progress=False)["ppl"]
    assert 5 < dense < 60, dense
    ppl = []
    for s in (0.25, 0.4, 0.5):
        larosa.sparsify(model, rot, s)
        ppl.append(larosa.perplexity(model, windows, progress=False)["ppl"])
    assert dense < ppl[0] < ppl[1] < ppl[2] < 4 * dense, (dense, ppl)
