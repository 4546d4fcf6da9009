"""Zero-shot accuracy through lm-evaluation-harness, run in-process on an already loaded (dense, simulated or
folded) model, optionally offline.

The paper's quality claim is zero-shot accuracy on eight stock lm-eval tasks. Those tasks read Hugging Face hub
datasets; offline, ``task_data`` names a directory of local JSON Lines files with the hub datasets' fields
(``<task>/<split>.jsonl``). Each stock task config is then reused through a generated YAML that ``include``s it
and only swaps the data source (``dataset_path: json`` plus ``data_files``), so prompts, choices and metrics stay
exactly lm-eval's. The data are never copied into the package (licences; SciQ is non-commercial).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import LarosaError
from ..streaming import check_finite

TASK_DATA_ENV = "LAROSA_TASK_DATA"


@dataclass(frozen=True)
class TaskSpec:
    """Where lm-eval keeps the stock config, which split it scores, and the fields its templates read."""

    config: str  # relative to lm_eval/tasks/
    split: str  # "validation" or "test": the split lm-eval evaluates, and the local file's stem
    fields: tuple[str, ...]


TASKS = {
    "arc_easy": TaskSpec("arc/arc_easy.yaml", "test", ("question", "choices", "answerKey")),
    "arc_challenge": TaskSpec("arc/arc_challenge.yaml", "test", ("question", "choices", "answerKey")),
    "boolq": TaskSpec("super_glue/boolq/default.yaml", "validation", ("passage", "question", "label")),
    "hellaswag": TaskSpec("hellaswag/hellaswag.yaml", "validation",
                          ("activity_label", "ctx_a", "ctx_b", "endings", "label")),
    "openbookqa": TaskSpec("openbookqa/openbookqa.yaml", "test", ("question_stem", "choices", "answerKey")),
    "piqa": TaskSpec("piqa/piqa.yaml", "validation", ("goal", "sol1", "sol2", "label")),
    "winogrande": TaskSpec("winogrande/default.yaml", "validation", ("sentence", "option1", "option2", "answer")),
    "sciq": TaskSpec("sciq/sciq.yaml", "test",
                     ("question", "support", "distractor1", "distractor2", "distractor3", "correct_answer")),
}
METRICS = ("acc", "acc_norm")


def parse_tasks(text: str) -> list[str]:
    """Comma-separated task names, checked against the tasks larosa knows the data layout and metrics of."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise LarosaError(f"unknown task(s) {', '.join(unknown) or repr(text)}; choose from {', '.join(TASKS)}")
    return names


def data_file(task_data: str | os.PathLike, task: str) -> Path:
    """The local file for ``task``, read through once so a bad file fails here in one line, not deep in lm-eval."""
    root = Path(task_data)
    if not root.is_dir():
        raise LarosaError(f"task data directory not found: {root}")
    spec = TASKS[task]
    path = root / task / f"{spec.split}.jsonl"
    if not path.is_file():
        raise LarosaError(f"no data for {task} in {root}: expected {path}")
    rows = 0
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LarosaError(f"{path}:{n}: not valid JSON ({e.msg})") from e
            missing = [k for k in spec.fields if not isinstance(row, dict) or k not in row]
            if missing:
                raise LarosaError(f"{path}:{n}: missing field(s) {', '.join(missing)} that {task} reads")
            rows += 1
    if not rows:
        raise LarosaError(f"{path} holds no rows")
    return path.resolve()


def resolve_task_data(tasks: list[str], task_data: str | os.PathLike | None) -> Path | None:
    """``task_data``, else ``$LAROSA_TASK_DATA``, else None (the hub); every requested task's file checked, so a
    missing or bad file is reported before a model is loaded."""
    task_data = task_data or os.environ.get(TASK_DATA_ENV) or None
    if task_data is None:
        return None
    for task in tasks:
        data_file(task_data, task)
    return Path(task_data)


def _stock_config(task: str) -> Path:
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / TASKS[task].config
    if not path.is_file():
        raise LarosaError(f"this lm-eval has no stock config {TASKS[task].config} for {task}")
    return path


def local_config(task: str, path: Path) -> dict:
    """The stock task with its data swapped for ``path``: only the scored split exists locally, so the others are
    cleared (lm-eval would otherwise look up a train split for its few-shot sampler)."""
    split = TASKS[task].split
    return {
        "include": str(_stock_config(task)),
        "task": task,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path)}},
        "training_split": None,
        "validation_split": split if split == "validation" else None,
        "test_split": split if split == "test" else None,
    }


def write_configs(tasks: list[str], task_data: str | os.PathLike, out: str | os.PathLike) -> Path:
    """One YAML per task under ``out``; also usable from lm-eval's own CLI as ``--include_path out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        config = local_config(task, data_file(task_data, task))
        (out / f"{task}.yaml").write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
    return out


@contextmanager
def _quiet(quiet: bool) -> Iterator[None]:
    """lm-eval has no quiet switch; its warnings (an already loaded model, zero-shot overrides) go by logging level."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _task_value(metrics: dict, name: str) -> float | None:
    value = metrics.get(f"{name},none")
    return float(value) if isinstance(value, (int, float)) else None


def evaluate_tasks(model, tokenizer, tasks: list[str], *, task_data: str | os.PathLike | None = None,
                   limit: int | None = None, batch_size: int = 1, progress: bool = True) -> dict:
    """acc and acc_norm (with stderr) per task and their means, zero-shot, by lm-eval's HF wrapper around ``model``.

    ``task_data`` (default ``$LAROSA_TASK_DATA``) switches to local files; without it lm-eval reads the hub.
    The acc_norm mean takes acc where a task defines no acc_norm (boolq, winogrande), as paper tables do.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise LarosaError("eval tasks needs lm-evaluation-harness: pip install 'larosa[tasks]'") from e
    task_data = resolve_task_data(tasks, task_data)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="larosa-tasks-") as tmp, _quiet(not progress):
        if task_data:  # only our generated configs: no clash with the stock names, no 15 s index of all tasks
            manager = TaskManager(include_path=str(write_configs(tasks, task_data, tmp)), include_defaults=False)
        else:
            manager = TaskManager()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        if not progress:  # the scoring bar; the evaluator has no switch for it (all eight tasks score this way)
            lm.loglikelihood = functools.partial(lm.loglikelihood, disable_tqdm=True)
        # lm-eval ranks the choices by log-likelihood: NaN logits would still give an accuracy
        guard = model.register_forward_hook(lambda m, args, out: check_finite(out.logits, "the model", m))
        try:
            out = lm_eval.simple_evaluate(lm, tasks=tasks, task_manager=manager, num_fewshot=0, limit=limit,
                                          log_samples=False)
        except ConnectionError as e:  # `datasets` could not reach the hub
            raise LarosaError(f"{e}; offline, give --task-data or ${TASK_DATA_ENV}") from e
        finally:
            guard.remove()
    per_task = {}
    for task in tasks:
        metrics = out["results"][task]
        per_task[task] = {k: _task_value(metrics, k) for name in METRICS for k in (name, f"{name}_stderr")}
        per_task[task]["n"] = out["n-samples"][task]["effective"]
    accs = [r["acc"] for r in per_task.values()]
    norms = [r["acc"] if r["acc_norm"] is None else r["acc_norm"] for r in per_task.values()]
    return {"tasks": per_task, "mean": {"acc": sum(accs) / len(accs), "acc_norm": sum(norms) / len(norms)},
            "limit": limit, "task_data": str(task_data) if task_data else None,
            "lm_eval_version": lm_eval.__version__, "seconds": round(time.perf_counter() - start, 1)}


def _cell(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.2f}" + (f" ± {100 * stderr:.2f}" if stderr is not None else "")


def table(runs: list[dict]) -> str:
    """Markdown in the layout of a paper's zero-shot table: a row per method and metric, a column per task,
    the mean, and the mean's difference from the dense run when there is one; accuracies in percent with stderr.
    Each run carries ``label``, ``mode`` and ``param_weighted_sparsity`` beside what :func:`evaluate_tasks`
    returns."""
    tasks = list(runs[0]["tasks"])
    dense = next((r for r in runs if r.get("mode") == "dense"), None)
    lines = ["| method | param-weighted sparsity | metric | " + " | ".join(tasks) + " | mean | vs dense |",
             "|---|---:|---|" + "---:|" * (len(tasks) + 2)]
    for run in runs:
        for metric in METRICS:
            cells = [_cell(run["tasks"][t][metric], run["tasks"][t][f"{metric}_stderr"]) for t in tasks]
            delta = "" if dense is None or run is dense else (
                f"{100 * (run['mean'][metric] - dense['mean'][metric]):+.2f}")
            lines.append(f"| {run['label']} | {run['param_weighted_sparsity']:.3f} | {metric} | "
                         + " | ".join(cells) + f" | {100 * run['mean'][metric]:.2f} | {delta} |")
    return "\n".join(lines)


if __name__ == "__main__":
    # `python -m larosa.tasks <lm-eval arguments>`: lm-eval's own command line, with larosa imported first, so a
    # saved folded directory (model types larosa_llama / larosa_qwen2) loads through `--model hf`.
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
