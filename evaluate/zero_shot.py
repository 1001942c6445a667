"""Zero-shot accuracy from lm-evaluation-harness (lm-eval), on saved checkpoints.

lm-eval imports the PyPI package `evaluate` for some metrics, and this repository's top-level
evaluate/ folder would shadow it in any process that has the repository on sys.path. So lm-eval
never runs here: each call starts `evaluate/lm_eval_worker.py` in a process of its own
(`python -I`, in a temporary folder: no repository folder on its sys.path), which loads the
checkpoint folder with transformers (`trust_remote_code` when the folder carries STAT's
modeling_stat.py, as pruned checkpoints do) and answers in JSON.
"""
import json
import os
import subprocess
import sys
import tempfile

from prerequisites.checkpoint import MODELING_FILE
from utils.errors import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "lm_eval_worker.py")
NUM_FEWSHOT = 0
CHOICE_TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_choice_task(folder, task, docs):
    """A multiple-choice lm-eval task named `task` over `docs` ({"question", "choices", "label"}
    each), written to `folder` as docs.jsonl and task.yaml: for --lm_eval_include_path folder."""
    data = os.path.join(folder, "docs.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(doc) + "\n" for doc in docs)
    with open(os.path.join(folder, "task.yaml"), "w", encoding="utf-8") as f:
        f.write(CHOICE_TASK_YAML.format(task=task, data=data))


def run_worker(request):
    """The worker's answer to `request` (see lm_eval_worker.run); a UserError if it failed."""
    with tempfile.TemporaryDirectory(prefix="stat-lm-eval-") as folder:
        request_path, result_path = os.path.join(folder, "request.json"), os.path.join(folder, "result.json")
        with open(request_path, "w", encoding="utf-8") as f:
            json.dump(request, f)
        process = subprocess.run([sys.executable, "-I", WORKER, request_path, result_path], cwd=folder)
        if not os.path.exists(result_path):
            raise UserError(f"lm-eval stopped before answering (exit status {process.returncode})")
        with open(result_path, encoding="utf-8") as f:
            result = json.load(f)
    if "error" in result:
        raise UserError(f"lm-eval: {result['error']}")
    if result.get("evaluate_module") and os.path.dirname(result["evaluate_module"]) == HERE:  # never, with -I
        raise UserError(f"lm-eval would import this repository's evaluate/ folder as the PyPI package `evaluate`")
    return result


def check_tasks(tasks, include_path=None):
    """A one-line error for task names lm-eval does not know (before any model work)."""
    unknown = run_worker({"mode": "check", "tasks": list(tasks), "include_path": include_path})["unknown_tasks"]
    if unknown:
        where = f"lm-eval's tasks or {include_path}" if include_path else "lm-eval's tasks"
        raise UserError(f"unknown lm-eval task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} (not in {where}; "
                        f"`lm_eval ls tasks` lists them)")


def score(checkpoints, tasks, include_path=None, limit=None, batch_size=8, device="cpu", dtype="float32"):
    """{label: {task: {'acc': .., 'acc_stderr': .., 'acc_norm': .., ..., 'samples': n}}} and the
    lm-eval version, for each (label, checkpoint folder) of `checkpoints` (in order, one
    process for all of them)."""
    models = [{"label": label, "path": os.path.abspath(path),
               "trust_remote_code": os.path.isfile(os.path.join(path, MODELING_FILE))}
              for label, path in checkpoints]
    result = run_worker({"mode": "evaluate", "tasks": list(tasks), "include_path": include_path,
                         "models": models, "num_fewshot": NUM_FEWSHOT, "limit": limit, "batch_size": batch_size,
                         "device": str(device), "dtype": dtype})
    return result["scores"], result["lm_eval_version"]


def lines(scores, metrics=("acc", "acc_norm")):
    """One line per task and metric, every model side by side:
    'zero-shot piqa acc: dense 0.6270 ± 0.0113  pruned 0.6012 ± 0.0114'."""
    labels = list(scores)
    out = []
    for task in scores[labels[0]]:
        for metric in metrics:
            if metric not in scores[labels[0]][task]:
                continue
            values = []
            for label in labels:
                entry = scores[label][task]
                stderr = entry.get(f"{metric}_stderr")
                values.append(f"{label} {entry[metric]:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else ""))
            out.append(f"zero-shot {task} {metric}: {'  '.join(values)}")
    return out
