"""sweep.py: grids from the command line and from files, checked against the script's own
flags before anything runs; the skip of points already done; a real local sweep of tiny runs
with one failing point; the SLURM job array up to the submission script submitit writes."""
import argparse
import glob
import json
import os
import re
import subprocess
import sys

import pytest
import submitit

import prune_bert
import sweep
import tiny
from pipelines import grid
from pipelines import sweep as sweep_lib
from pipelines.sweep_job import run_point
from test_prune_bert_cli import write_sst2
from utils.cli import run_main
from utils.results import REPO_ROOT

TINY = ["--model_name", "m", "--task_name", "sst2"]


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: sys.exit(sweep.main(argv)))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err.strip()


def test_every_combination_of_the_lists_in_order(tmp_path):
    built = grid.build("prune_bert.py", [*TINY, "--method", "stat", "magnitude", "--mu", "0.4", "0.5",
                                         "--seed", "0", "1", "2", "--output_dir", str(tmp_path)])
    assert built.script == "prune_bert.py" and len(built.points) == 12
    first, second, last = built.points[0], built.points[1], built.points[-1]
    assert first.flags == (*TINY, "--method", "stat", "--mu", "0.4", "--seed", "0", "--output_dir", str(tmp_path))
    assert second.flags[-3] == "1" and last.flags[5:10] == ("magnitude", "--mu", "0.5", "--seed", "2")
    assert first.name == "method=stat_mu=0.4_seed=0" and last.name == "method=magnitude_mu=0.5_seed=2"
    assert len({p.name for p in built.points}) == 12
    assert {p.results for p in built.points} == {os.path.join(str(tmp_path), "m", "sst2.jsonl")}
    combos = {(prune_bert.parse_args(p.flags).method, prune_bert.parse_args(p.flags).mu,
               prune_bert.parse_args(p.flags).seed) for p in built.points}
    assert combos == {(m, mu, s) for m in ("stat", "magnitude") for mu in (0.4, 0.5) for s in (0, 1, 2)}


def test_switches_negative_values_and_equals_signs():
    points = grid.build("quantize_opt.py", ["--model_name=m", "--mu", "0.9", "--wbits", "4",
                                            "--groupsize", "-1", "128", "--sym", "true", "false"]).points
    assert [p.flags for p in points] == [
        ("--model_name", "m", "--mu", "0.9", "--wbits", "4", "--groupsize", "-1", "--sym"),
        ("--model_name", "m", "--mu", "0.9", "--wbits", "4", "--groupsize", "-1"),
        ("--model_name", "m", "--mu", "0.9", "--wbits", "4", "--groupsize", "128", "--sym"),
        ("--model_name", "m", "--mu", "0.9", "--wbits", "4", "--groupsize", "128"),
    ]
    assert [p.name for p in points] == ["groupsize=-1_sym=true", "groupsize=-1_sym=false",
                                        "groupsize=128_sym=true", "groupsize=128_sym=false"]
    assert points[0].results == os.path.join("output", "opt", "m.jsonl")
    alone = grid.build("opt_eval.py", ["--model_name", "m", "--wbits", "4", "--sym"]).points
    assert [p.flags for p in alone] == [("--model_name", "m", "--wbits", "4", "--sym")]


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_grid_files_give_the_same_points_and_the_command_line_overrides_them(tmp_path, suffix):
    content = {"script": "prune_bert.py",
               "grid": [{"model_name": "m", "task_name": "sst2", "mu": [0.4, 0.5], "seed": [0, 1]},
                        {"model_name": "m", "task_name": "mrpc", "mu": 0.5, "method": "magnitude"}]}
    path = tmp_path / f"g.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(content))
    else:
        path.write_text("script: prune_bert.py\ngrid:\n"
                        "  - {model_name: m, task_name: sst2, mu: [0.4, 0.5], seed: [0, 1]}\n"
                        "  - model_name: m\n    task_name: mrpc\n    mu: 0.5\n    method: magnitude\n")
    points = grid.build(None, [], str(path)).points
    cli = grid.build("prune_bert.py", [*TINY, "--mu", "0.4", "0.5", "--seed", "0", "1"]).points
    assert [p.flags for p in points[:4]] == [p.flags for p in cli]
    assert points[4].flags == ("--model_name", "m", "--task_name", "mrpc", "--mu", "0.5", "--method", "magnitude")
    assert len(points) == 5 and len({p.name for p in points}) == 5

    overridden = grid.build(None, ["--seed", "7"], str(path)).points
    assert [p.flags[-1] for p in overridden] == ["7", "7", "7"]  # and the duplicate points merged
    assert overridden[2].flags[-4:] == ("--method", "magnitude", "--seed", "7")


def test_normalised_command_lines_ignore_order_and_equals_signs():
    assert grid.normalised(["--mu", "0.5", "--seed", "1", "--sym"]) == grid.normalised(["--sym", "--seed=1", "--mu",
                                                                                        "0.5"])
    assert grid.normalised(["--mu", "0.5"]) != grid.normalised(["--mu", "0.6"])
    assert grid.normalised(["--mu", "0.5"]) != grid.normalised(["--mu", "0.5", "--sym"])


def write_records(path, argvs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for argv in argvs:
            f.write(json.dumps({"argv": argv, "mu": 0.5} if argv else {"mu": 0.5}) + "\n")


def test_points_already_written_are_skipped_unless_rerun(tmp_path, capsys):
    out = str(tmp_path / "out")
    write_records(os.path.join(out, "m", "sst2.jsonl"), [
        ["prune_bert.py", "--seed", "0", "--task_name", "sst2", "--mu=0.4", "--output_dir", out, "--model_name", "m"],
        ["prune_bert.py", *TINY, "--mu", "0.5", "--seed", "1", "--output_dir", out],
        ["prune_opt.py", *TINY, "--mu", "0.5", "--seed", "0", "--output_dir", out],  # another script
        ["prune_bert.py", *TINY, "--mu", "0.5", "--seed", "0", "--output_dir", out, "--method", "magnitude"],
        None,  # a record from before argv was written
    ])
    argv = ["--script", "prune_bert.py", *TINY, "--mu", "0.4", "0.5", "--seed", "0", "1", "--output_dir", out,
            "--log_dir", str(tmp_path / "logs"), "--dry_run"]
    todo, done = grid.split_done(grid.build("prune_bert.py", argv[2:-3]).points)
    assert [p.name for p in done] == ["mu=0.4_seed=0", "mu=0.5_seed=1"]
    assert [p.name for p in todo] == ["mu=0.4_seed=1", "mu=0.5_seed=0"]

    code, out_text, _ = run_cli(argv, capsys)
    assert code == 0 and "4 points, 2 already done, 2 to run" in out_text
    assert f"[done] mu=0.4_seed=0: python prune_bert.py --model_name m --task_name sst2 --mu 0.4 --seed 0 " \
           f"--output_dir {out}" in out_text
    assert "[run ] mu=0.5_seed=0:" in out_text
    code, out_text, _ = run_cli(argv + ["--rerun"], capsys)
    assert code == 0 and "4 points, 0 already done, 4 to run" in out_text
    assert not os.path.exists(tmp_path / "logs")  # a dry run starts nothing


@pytest.mark.parametrize("argv,expected", [
    (["--script", "prune_bert.py", *TINY, "--mu", "0.5", "--temperature", "2"], "prune_bert.py has no flag "
                                                                                 "--temperature"),
    (["--script", "prune_bart.py", *TINY, "--mu", "0.5"], "unknown script 'prune_bart.py'"),
    (["*TINY", *TINY, "--mu", "0.5"], "no script to sweep"),
    (["--script", "prune_bert.py", *TINY, "--mu", "--seed", "0"], "--mu: empty list of values"),
    (["--script", "prune_bert.py", "--grid", "{tmp}/empty.yaml"], "--mu: empty list of values"),
    (["--script", "prune_bert.py", *TINY, "--mu", "0.5", "1.5"], "point mu=1.5: argument --mu: mu must be in (0, 1]"),
    (["--script", "prune_bert.py", "--model_name", "m", "--mu", "0.5"], "required: --task_name"),
    (["--script", "prune_bert.py", "0.5", *TINY, "--mu", "0.5"], "'0.5' in the grid is not a flag's value"),
    (["--script", "prune_bert.py", *TINY, "--mu", "0.5", "--mu", "0.6"], "--mu is given twice"),
    (["--script", "prune_bert.py", *TINY, "--mu", "0.5", "--method", "stat", "--jobs", "2", "--cluster", "slurm"],
     "--jobs applies to --cluster local"),
    (["--script", "prune_bert.py", *TINY, "--mu", "0.5", "--partition", "gpu"], "--partition apply to --cluster "
                                                                                "slurm only"),
    (["--grid", "{tmp}/bad-key.yaml"], "unknown key 'flags'"),
    (["--grid", "{tmp}/missing.yaml"], "cannot read the grid file"),
    (["--script", "prune_bert.py", *TINY, "--mu", "0.5", "--name", "a/b"], "--name 'a/b': use letters"),
])
def test_a_bad_grid_fails_with_one_line_before_any_job_starts(tmp_path, capsys, argv, expected):
    (tmp_path / "empty.yaml").write_text("grid: {model_name: m, task_name: sst2, mu: []}\n")
    (tmp_path / "bad-key.yaml").write_text("script: prune_bert.py\nflags: {mu: 0.5}\ngrid: {mu: 0.5}\n")
    argv = [a.format(tmp=tmp_path) for a in argv if a != "*TINY"]
    code, _, err = run_cli(argv + ["--log_dir", str(tmp_path / "logs")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err
    assert not os.path.exists(tmp_path / "logs")  # nothing was submitted


def test_the_command_line_reports_a_bad_grid_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "sweep.py"), "--script", "prune_opt.py",
                             "--model_name", "m", "--mu", "0.5", "--nsample", "4"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr == "error: prune_opt.py has no flag --nsample\n"
    assert not os.path.exists(tmp_path / "logs")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    tiny.save_checkpoint(tiny.bert(), root / "tiny-bert", tiny.minilm_dir())
    write_sst2(str(root / "SST-2"))
    return root


def test_a_local_sweep_runs_each_point_as_a_process_and_keeps_the_failed_ones_log(tiny_checkpoint, tmp_path,
                                                                                    monkeypatch):
    """Two good points and one whose checkpoint is missing, two at a time; the records the good
    ones wrote mark them done for the next run of the same sweep."""
    good, data = str(tiny_checkpoint / "tiny-bert"), str(tiny_checkpoint / "SST-2")
    common = {"model_name": "tiny-bert", "task_name": "sst2", "mu": 0.5, "data_dir": data, "device": "cpu",
              "sample_batch_size": 16, "batch_size": 8, "output_dir": "out"}
    (tmp_path / "tiny.yaml").write_text(json.dumps({"script": "prune_bert.py", "grid": [
        {**common, "model_dir": good, "seed": [0, 1]},
        {**common, "model_dir": str(tmp_path / "missing"), "seed": 0},
    ]}))
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "sweep.py"), "--grid", "tiny.yaml",
                             "--cluster", "local", "--jobs", "2"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    points = grid.build(None, [], str(tmp_path / "tiny.yaml")).points
    failed = points[2].name
    assert failed == "model_dir=" + re.sub(r"[^A-Za-z0-9._=+-]", "-", str(tmp_path / "missing")) + "_seed=0"
    assert "3 points of prune_bert.py, 0 already done" in result.stdout
    assert "2 points ran, 1 failed, 0 skipped" in result.stdout
    assert f"failed: {failed} (exit status 2), log: {os.path.join('logs', 'tiny', failed + '.log')}" in result.stdout
    assert "sweep tiny: 100%" in result.stderr  # the progress bar
    logs = tmp_path / "logs" / "tiny"
    log = (logs / f"{failed}.log").read_text()
    assert "error: checkpoint not found" in log and "# exit status 2 after" in log
    for point in points[:2]:
        assert "# exit status 0 after" in (logs / f"{point.name}.log").read_text()

    records = [json.loads(line) for line in open(tmp_path / "out" / "tiny-bert" / "sst2.jsonl")]
    assert sorted(tuple(r["argv"]) for r in records) == sorted(("prune_bert.py", *p.flags) for p in points[:2])
    monkeypatch.chdir(tmp_path)  # the result paths are relative to where the sweep runs
    todo, done = grid.split_done(points)
    assert done == points[:2] and todo == points[2:]


def test_the_debug_cluster_runs_in_this_process(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(["--script", "prune_bert.py", *TINY, "--mu", "0.5", "--model_dir", "missing",
                            "--cluster", "debug"], capsys)
    assert code == 1 and "0 points ran, 1 failed" in out
    log = (tmp_path / "logs" / "prune_bert" / "point.log").read_text()
    assert "error: checkpoint missing is neither a local folder nor in the local Hugging Face cache" in log


def test_a_job_runs_its_command_with_the_environment_asked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("STAT_TEST_DROP", "x")
    log = tmp_path / "logs" / "p.log"
    code = run_point([sys.executable, "-c", "import os, sys; print(os.environ.get('STAT_TEST_DROP'), "
                                            "os.environ['STAT_TEST_SET'], os.getcwd()); sys.exit(3)"],
                     str(log), str(tmp_path), {"STAT_TEST_DROP": None, "STAT_TEST_SET": "y"})
    assert code == 3
    lines = log.read_text().splitlines()
    assert lines[0].startswith(f"$ {sys.executable} -c ") and lines[2] == f"None y {tmp_path}"
    assert lines[-1].startswith("# exit status 3 after")


def test_slurm_gets_one_job_array_with_the_resources_asked_for(tmp_path, capsys, monkeypatch):
    """No cluster here: a stand-in sbatch accepts the submission; the script submitit wrote is
    what SLURM would run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/sbatch-args\n"
                                    "echo 'Submitted batch job 4242'\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it to know SLURM is there
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(["--script", "prune_bert.py", *TINY, "--mu", "0.4", "0.5", "0.6", "--cluster", "slurm",
                            "--partition", "gpu", "--gpus_per_job", "1", "--cpus_per_job", "4", "--mem_gb", "16",
                            "--time_min", "90", "--array_parallelism", "2", "--slurm_option", "account=proj",
                            "--no_wait", "--name", "glue"], capsys)
    assert code == 0 and "submitted SLURM job array 4242 (3 points)" in out
    folder = tmp_path / "logs" / "glue" / "submitit"
    script = (folder / "4242_submission.sh").read_text()
    assert (tmp_path / "sbatch-args").read_text().strip().endswith(".sh")
    options = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script, re.M))
    assert options["partition"] == "gpu" and options["array"] == "0-2%2" and options["time"] == "90"
    assert options["gpus-per-node"] == "1" and options["cpus-per-task"] == "4" and options["mem"] == "16GB"
    assert options["job-name"] == "glue" and options["account"] == "proj"
    assert f"export PYTHONPATH={REPO_ROOT}" in script
    assert "-m submitit.core._submit" in script

    for task, mu in enumerate(("0.4", "0.5", "0.6")):  # what each task of the array will run
        job = submitit.core.utils.DelayedSubmission.load(folder / f"4242_{task}_submitted.pkl")
        command, log, cwd, env = job.args
        assert job.function is run_point and cwd == str(tmp_path) and "CUDA_VISIBLE_DEVICES" not in env
        assert command == [sys.executable, os.path.join(REPO_ROOT, "prune_bert.py"), *TINY, "--mu", mu]
        assert log == str(tmp_path / "logs" / "glue" / f"mu={mu}.log")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO_ROOT, "grids", "*.yaml"))))
def test_the_grid_files_in_the_repository_are_valid(path):
    built = grid.build(None, [], path)
    assert built.points and len({p.name for p in built.points}) == len(built.points)


def test_local_jobs_see_the_sweeps_gpus_and_share_the_cores(tmp_path, monkeypatch):
    """submitit's local executor empties CUDA_VISIBLE_DEVICES for a job that asked for no GPU;
    a point's process gets the sweep's value back, and its share of the cores."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    args = argparse.Namespace(cluster="local", time_min=5)
    executor = sweep_lib.make_executor(args, "env", str(tmp_path / "submitit"))
    show = [sys.executable, "-c", "import os; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')), "
                                  "os.environ.get('OMP_NUM_THREADS'))"]
    jobs = [executor.submit(run_point, show, str(tmp_path / f"{i}.log"), str(tmp_path), changes)
            for i, changes in enumerate([sweep_lib.job_environment("local", 2), {}])]
    assert [job.result() for job in jobs] == [0, 0]
    assert (tmp_path / "0.log").read_text().splitlines()[2] == f"'1,3' {max(1, os.cpu_count() // 2)}"
    assert (tmp_path / "1.log").read_text().splitlines()[2] == "'' None"  # what submitit alone gives
