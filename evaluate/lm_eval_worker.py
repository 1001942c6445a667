"""Runs lm-evaluation-harness for evaluate/zero_shot.py, in a process of its own.

Started as `python -I lm_eval_worker.py REQUEST.json RESULT.json` in a temporary folder. `-I`
keeps this script's folder, the working directory and PYTHONPATH off sys.path, so that the
`import evaluate` lm-eval does (for some metrics) finds the PyPI package, never the
repository's evaluate/ folder. For the same reason this file imports nothing of the repository:
it reads its request (a JSON object, see `run`) and writes its answer as JSON, always, with an
`error` entry when something failed.
"""
import importlib.util
import json
import sys


def task_manager(tasks, include_path):
    """lm-eval's index of tasks; only the include path's when it has every task asked for (the
    built-in index takes seconds to build, and the include path would take precedence anyway)."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    return TaskManager(include_path=include_path)


def metrics_of(task_results):
    """{'acc': 0.5, 'acc_stderr': 0.14, ...} from lm-eval's {'acc,none': 0.5, ...}; a metric under
    another filter than 'none' keeps its filter in its name; missing stderrs ('N/A') are left out."""
    out = {}
    for key, value in task_results.items():
        name, _, filter_name = key.partition(",")
        if filter_name and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name if filter_name == "none" else key] = value
    return out


def run(request):
    """request: {"mode": "check" | "evaluate", "tasks": [...], "include_path": str | None, and for
    "evaluate": "models": [{"label", "path", "trust_remote_code"}], "num_fewshot", "limit",
    "batch_size", "device", "dtype"}."""
    spec = importlib.util.find_spec("evaluate")
    found = {"evaluate_module": spec.origin if spec else None}
    try:
        import lm_eval
    except ImportError as err:
        return {**found, "error": f"lm-eval is not installed in {sys.executable}'s environment ({err}); "
                                  "`make` installs lm-eval==0.4.13"}
    found["lm_eval_version"] = lm_eval.__version__
    manager = task_manager(request["tasks"], request.get("include_path"))
    unknown = [task for task in request["tasks"] if task not in manager.all_tasks]
    if unknown or request["mode"] == "check":
        return {**found, "unknown_tasks": unknown}

    from lm_eval import simple_evaluate

    scores = {}
    for model in request["models"]:
        out = simple_evaluate(
            model="hf",
            model_args={"pretrained": model["path"], "trust_remote_code": model["trust_remote_code"],
                        "dtype": request["dtype"]},
            tasks=request["tasks"], num_fewshot=request["num_fewshot"], batch_size=request["batch_size"],
            device=request["device"], limit=request["limit"], task_manager=manager, log_samples=False)
        scores[model["label"]] = {}
        for task, results in out["results"].items():
            samples = out.get("n-samples", {}).get(task, {}).get("effective")
            scores[model["label"]][task] = {**metrics_of(results), **({"samples": samples} if samples else {})}
    return {**found, "scores": scores}


def main(request_path, result_path):
    with open(request_path, encoding="utf-8") as f:
        request = json.load(f)
    try:
        result = run(request)
    except Exception as err:  # reported to the parent, which turns it into a one-line error
        result = {"error": f"{type(err).__name__}: {' '.join(str(err).split())}"}
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
