"""eval tasks: stock lm-eval tasks pointed at local files, run in-process on the tiny models; no hub, no downloads."""

import json

import pytest

pytest.importorskip("lm_eval")

from conftest import SHARED_DATA, TEXT, tiny_model, train_tokenizer
from test_cli import run

from larosa.errors import LarosaError
from larosa.eval.tasks import TASK_DATA_ENV, data_file, write_configs

WORDS = TEXT.split()


def arc_row(i: int) -> dict:
    return {"id": f"q{i}", "question": " ".join(WORDS[i:i + 8]),
            "choices": {"text": [" ".join(WORDS[i + j:i + j + 3]) for j in range(4)], "label": list("ABCD")},
            "answerKey": "ABCD"[i % 4]}


def boolq_row(i: int) -> dict:
    return {"question": " ".join(WORDS[i:i + 6]), "passage": " ".join(WORDS[i + 6:i + 20]), "idx": i,
            "label": i % 2}


def write_jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def task_data(tmp_path):
    """Six rows each of arc_easy and boolq in the layout of ../shared/data/tasks."""
    root = tmp_path / "tasks"
    write_jsonl(root / "arc_easy" / "test.jsonl", [arc_row(i) for i in range(6)])
    write_jsonl(root / "boolq" / "validation.jsonl", [boolq_row(i) for i in range(6)])
    return root


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keep the Arrow copies `datasets` makes of the local files out of the user's cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


@pytest.fixture
def lm_dir(tmp_path):
    """The tiny Llama with a tokenizer that has an end-of-text token, which lm-eval uses as the context prefix."""
    path = tmp_path / "tiny-llama"
    tokenizer = train_tokenizer(TEXT)
    tokenizer.eos_token = "<unk>"
    tiny_model("llama", vocab=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    return path


def test_generated_config_reads_the_local_file_with_the_stock_templates(task_data, tmp_path):
    from lm_eval.tasks import TaskManager

    include = write_configs(["arc_easy", "boolq"], task_data, tmp_path / "configs")
    loaded = TaskManager(include_path=str(include), include_defaults=False).load(["arc_easy", "boolq"])["tasks"]
    arc, boolq = loaded["arc_easy"], loaded["boolq"]
    assert arc.config.dataset_path == "json" and arc.config.training_split is None
    docs = list(arc.eval_docs)
    assert [d["id"] for d in docs] == [f"q{i}" for i in range(6)]
    row = arc_row(0)
    assert arc.doc_to_text(docs[0]) == f"Question: {row['question']}\nAnswer:"  # the stock template
    assert arc.doc_to_target(docs[0]) == 0 and arc.doc_to_choice(docs[0]) == row["choices"]["text"]
    assert len(boolq.eval_docs) == 6 and boolq.doc_to_choice(boolq.eval_docs[0]) == ["no", "yes"]


def test_eval_tasks_dense_and_sparse_end_to_end(lm_dir, task_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(TASK_DATA_ENV, str(task_data))  # the environment variable instead of --task-data
    common = ("eval", "tasks", lm_dir, "--tasks", "arc_easy,boolq", "--limit", 4, "--batch-size", 2, "--json")
    code, out, err = run(capsys, *common)
    assert code == 0, err
    dense = json.loads(out)
    assert dense["mode"] == "dense" and dense["task_data"] == str(task_data) and dense["limit"] == 4
    for r in dense["tasks"].values():
        assert 0 <= r["acc"] <= 1 and r["n"] == 4 and r["acc_stderr"] is not None
    assert dense["tasks"]["boolq"]["acc_norm"] is None and 0 <= dense["tasks"]["arc_easy"]["acc_norm"] <= 1
    assert dense["mean"]["acc"] == pytest.approx(sum(r["acc"] for r in dense["tasks"].values()) / 2)
    assert "| dense | 0.000 | acc | " in dense["table"] and "| arc_easy | boolq | mean |" in dense["table"]

    rot = tmp_path / "rot.safetensors"
    assert run(capsys, "calibrate", lm_dir, "--data", tmp_path / "text.txt", "--out", rot, "--windows", 4,
               "--seq-len", 32, "--signal", "gainfree", "--quiet")[0] == 0
    settings = ("--rotations", rot, "--sparsity", 0.4, "--scope", "block")
    assert run(capsys, "sparsify", lm_dir, *settings, "--out", tmp_path / "folded", "--quiet")[0] == 0
    simulated = json.loads(run(capsys, *common, *settings)[1])
    folded = json.loads(run(capsys, "eval", "tasks", tmp_path / "folded", *common[3:])[1])
    assert simulated["mode"] == "simulate" and folded["mode"] == "folded"
    assert simulated["param_weighted_sparsity"] == pytest.approx(folded["param_weighted_sparsity"])
    assert folded["param_weighted_sparsity"] > 0.3
    # the same Q (gain-free signal, block scope) gives the same model, so the same choices
    assert {t: r["acc"] for t, r in folded["tasks"].items()} == {t: r["acc"] for t, r in simulated["tasks"].items()}


def test_eval_tasks_prints_a_markdown_table_quietly(lm_dir, task_data, capsys):
    code, out, err = run(capsys, "eval", "tasks", lm_dir, "--tasks", "boolq", "--limit", 2, "--task-data", task_data,
                         "--quiet")
    assert code == 0 and out.startswith("| method | param-weighted sparsity | metric | boolq | mean |")
    assert "| dense | 0.000 | acc_norm | – |" in out and "loglikelihood" not in err


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "arc_easy,mmlu"], "unknown task(s) mmlu"),
    (["--tasks", "arc_easy", "--task-data", "nowhere"], "task data directory not found"),
    (["--tasks", "piqa"], "no data for piqa"),
])
def test_bad_tasks_exit_2_with_a_message(lm_dir, task_data, capsys, argv, message):
    argv = [str(task_data.parent / a) if a == "nowhere" else a for a in argv]
    code, _, err = run(capsys, "eval", "tasks", lm_dir, "--task-data", task_data, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("line, message", [
    ('{"id": "q9", "question": "x", "choices": {"text": ["a"], "label": ["A"]}', "not valid JSON"),
    ('{"id": "q9", "question": "x", "answerKey": "A"}', "missing field(s) choices"),
    ('["not", "an", "object"]', "missing field(s) question, choices, answerKey"),
])
def test_malformed_task_file_is_a_clear_error(task_data, line, message):
    path = task_data / "arc_easy" / "test.jsonl"
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(LarosaError, match=r"test\.jsonl:7: ") as e:
        data_file(task_data, "arc_easy")
    assert message in str(e.value)


def test_empty_task_file_is_a_clear_error(task_data):
    (task_data / "boolq" / "validation.jsonl").write_text("\n")
    with pytest.raises(LarosaError, match="holds no rows"):
        data_file(task_data, "boolq")


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "tasks").is_dir(), reason="needs ../shared/data/tasks beside the checkout")
def test_smollm2_on_the_shared_task_data(capsys):
    code, out, err = run(capsys, "eval", "tasks", "builtin:smollm2", "--tasks", "arc_easy,boolq", "--limit", 8,
                         "--batch-size", 4, "--task-data", SHARED_DATA / "tasks", "--device", "cpu", "--json",
                         "--quiet")
    assert code == 0, err
    result = json.loads(out)
    assert [r["n"] for r in result["tasks"].values()] == [8, 8]
    assert 0.25 < result["tasks"]["arc_easy"]["acc"] <= 1  # above chance (6 of 8 when measured)


def test_table_reports_each_runs_difference_from_dense():
    from larosa.eval.tasks import table

    def run(label, mode, acc):
        return {"label": label, "mode": mode, "param_weighted_sparsity": 0.0 if mode == "dense" else 0.375,
                "tasks": {"boolq": {"acc": acc, "acc_stderr": 0.01, "acc_norm": None, "acc_norm_stderr": None}},
                "mean": {"acc": acc, "acc_norm": acc}}

    lines = table([run("dense", "dense", 0.62), run("LaRoSa simulate", "simulate", 0.585)]).splitlines()
    assert lines[0].endswith("| mean | vs dense |")
    assert lines[2].endswith("| 62.00 |  |") and lines[4].endswith("| 58.50 | -3.50 |")


def test_eval_tasks_runs_a_peer_and_labels_it(lm_dir, task_data, tmp_path, capsys):
    code, out, err = run(capsys, "eval", "tasks", lm_dir, "--tasks", "boolq", "--limit", 2, "--task-data", task_data,
                         "--method", "teal", "--target", 0.4, "--calib-data", tmp_path / "text.txt",
                         "--calib-windows", 1, "--calib-seq-len", 256, "--quiet")  # the default 2048 > its context
    assert code == 0, err
    assert "| TEAL uniform | 0.400 | acc |" in out


def test_eval_tasks_on_a_model_giving_nan_is_an_error(lm_dir, task_data, capsys):
    """lm-eval ranks choices by log-likelihood, so NaN logits would still give an accuracy (issue 16)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(lm_dir / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, lm_dir / "model.safetensors", metadata={"format": "pt"})
    code, out, err = run(capsys, "eval", "tasks", lm_dir, "--tasks", "boolq", "--limit", 2, "--task-data", task_data,
                         "--quiet")
    assert code == 2 and out == "" and err.strip().splitlines()[-1] == (
        "larosa: error: the model gives NaN or Inf: its model.layers.1.mlp.down_proj.weight holds NaN or Inf (a "
        "broken checkpoint: download or save the model again)")


@pytest.mark.parametrize("arch", ["gemma3", "phi3"])
def test_eval_tasks_runs_the_families_that_differ_most(arch, task_data, tmp_path, capsys):
    """Gemma 3 (output norms: folded in the input form, its default) and Phi-3 (fused weights): dense, simulated
    and folded through lm-eval, the folded model choosing as simulate mode does for the same Q."""
    path = tmp_path / arch
    tokenizer = train_tokenizer(TEXT)
    tokenizer.eos_token = "<unk>"
    tiny_model(arch, vocab=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    rot = tmp_path / "rot.safetensors"
    assert run(capsys, "calibrate", path, "--data", tmp_path / "text.txt", "--out", rot, "--windows", 4,
               "--seq-len", 32, "--signal", "gainfree", "--quiet")[0] == 0
    settings = ("--rotations", rot, "--sparsity", 0.4, "--scope", "global")
    assert run(capsys, "sparsify", path, *settings, "--out", tmp_path / "folded", "--quiet")[0] == 0
    common = ("--tasks", "boolq", "--task-data", task_data, "--limit", 4, "--json")
    dense = json.loads(run(capsys, "eval", "tasks", path, *common)[1])
    simulated = json.loads(run(capsys, "eval", "tasks", path, *common, *settings)[1])
    folded = json.loads(run(capsys, "eval", "tasks", tmp_path / "folded", *common)[1])
    assert [r["mode"] for r in (dense, simulated, folded)] == ["dense", "simulate", "folded"]
    assert folded["param_weighted_sparsity"] == pytest.approx(simulated["param_weighted_sparsity"])
    assert folded["param_weighted_sparsity"] > 0.3
    assert folded["tasks"]["boolq"]["acc"] == simulated["tasks"]["boolq"]["acc"]
    assert 0 <= dense["tasks"]["boolq"]["acc"] <= 1 and folded["tasks"]["boolq"]["n"] == 4
