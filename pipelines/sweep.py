"""Running a sweep (sweep.py): every point of a grid as its own process of the run script,
through submitit: on this machine (at most --jobs at once), as one SLURM job array, or in
this process for debugging. Points whose result is already written are skipped; each point's
output goes to <log_dir>/<sweep name>/<point>.log.
"""
import concurrent.futures
import os
import shlex
import sys
import threading
from typing import NamedTuple, Optional

import submitit
from tqdm import tqdm

from pipelines import grid
from pipelines.sweep_job import run_point
from utils.errors import UserError
from utils.results import REPO_ROOT

CLUSTERS = ("local", "slurm", "debug")
SLURM_FLAGS = ("partition", "gpus_per_job", "cpus_per_job", "mem_gb", "array_parallelism", "slurm_option",
               "no_wait")


class Outcome(NamedTuple):
    """How a point's job ended: its exit status, or why it has none (killed, timed out)."""
    point: grid.Point
    returncode: Optional[int] = None
    error: Optional[str] = None

    @property
    def failed(self):
        return self.error is not None or self.returncode != 0

    def describe(self):
        return f"exit status {self.returncode}" if self.error is None else self.error


def check_cluster_flags(args):
    """One-line errors for flags that the chosen cluster would ignore."""
    if args.cluster != "slurm":
        given = [f"--{f}" for f in SLURM_FLAGS if getattr(args, f) not in (None, False, [])]
        if given:
            raise UserError(f"{', '.join(given)} apply to --cluster slurm only")
    elif args.jobs is not None:
        raise UserError("--jobs applies to --cluster local (on SLURM: --array_parallelism)")


def sweep_name(args, built):
    if args.name:
        if not all(c.isalnum() or c in "._-" for c in args.name):
            raise UserError(f"--name {args.name!r}: use letters, digits, '.', '_' and '-' only")
        return args.name
    stem = args.grid if args.grid else built.script
    return os.path.splitext(os.path.basename(stem))[0]


def command_of(point):
    return [sys.executable, os.path.join(REPO_ROOT, point.script), *point.flags]


def shown(point):
    """The command as a person would type it from the repository root."""
    return shlex.join(["python", point.script, *point.flags])


def log_path(log_dir, point):
    return os.path.join(log_dir, f"{point.name}.log")


def run(args, tokens):
    """Everything sweep.py does, from its own flags and the grid's tokens; the exit status."""
    check_cluster_flags(args)
    built = grid.build(args.script, tokens, args.grid)
    name = sweep_name(args, built)
    log_dir = os.path.join(args.log_dir, name)
    todo, done = (built.points, []) if args.rerun else grid.split_done(built.points)
    if args.dry_run:
        print_plan(built, todo, done, log_dir)
        return 0
    print(f"sweep {name}: {len(built.points)} points of {built.script}, {len(done)} already done (skipped"
          f"{'' if not done else '; --rerun runs them again'}), {len(todo)} to run on {describe_cluster(args)}; "
          f"logs in {log_dir}/")
    if not todo:
        return 0
    executor = make_executor(args, name, os.path.join(log_dir, "submitit"))
    jobs = (args.jobs or 1) if args.cluster == "local" else 1
    env_changes = job_environment(args.cluster, jobs)

    def submit(point):
        return executor.submit(run_point, command_of(point), os.path.abspath(log_path(log_dir, point)), os.getcwd(),
                               env_changes)

    if args.cluster == "slurm":
        outcomes = run_array(executor, submit, todo, name, args.no_wait)
        if outcomes is None:
            return 0
    else:
        outcomes = run_here(submit, todo, name, jobs)
    return summarize(outcomes, log_dir, len(done))


def describe_cluster(args):
    if args.cluster == "local":
        return f"this machine, {args.jobs or 1} at once"
    if args.cluster == "slurm":
        return f"SLURM (partition {args.partition or 'default'})"
    return "this process (debug)"


def print_plan(built, todo, done, log_dir):
    print(f"grid of {built.script}:")
    for i, g in enumerate(built.grids):
        if len(built.grids) > 1:
            print(f"  grid {i + 1}:")
        for flag, values in g.items():
            print(f"    --{flag}: {' '.join(_show_value(v) for v in values)}")
    print(f"{len(built.points)} points, {len(done)} already done, {len(todo)} to run; logs in {log_dir}/")
    skipped = {p.name for p in done}
    for point in built.points:
        status = "done" if point.name in skipped else "run "
        print(f"  [{status}] {point.name}: {shown(point)}")


def _show_value(value):
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + " ".join(value) + "]"
    return value


# ---------------------------------------------------------------------------------------------
# submitit


def make_executor(args, name, folder):
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=args.cluster)
    except RuntimeError as err:  # no srun on this machine
        raise UserError(f"--cluster {args.cluster}: {err}")
    # the job's process must find pipelines/ wherever the sweep was started from
    setup = [f"export PYTHONPATH={shlex.quote(REPO_ROOT)}${{PYTHONPATH:+:$PYTHONPATH}}"]
    parameters = {"name": name, "timeout_min": args.time_min}
    if args.cluster == "local":
        parameters["local_setup"] = setup
    elif args.cluster == "slurm":
        parameters.update(slurm_setup=setup, slurm_array_parallelism=args.array_parallelism or 256,
                          slurm_partition=args.partition, gpus_per_node=args.gpus_per_job,
                          cpus_per_task=args.cpus_per_job, mem_gb=args.mem_gb,
                          slurm_additional_parameters=slurm_options(args.slurm_option or []))
    executor.update_parameters(**{k: v for k, v in parameters.items() if v is not None and v != {}})
    return executor


def slurm_options(pairs):
    """{'account': 'x'} from ['account=x']: sbatch options submitit has no parameter for."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--slurm_option {pair!r}: expected KEY=VALUE (e.g. account=myproject)")
        options[key.lstrip("-")] = value
    return options


def job_environment(cluster, jobs):
    """What a point's process changes in the job's environment. Output unbuffered, so that the
    log follows the run. On this machine: the GPUs the sweep sees (submitit's local executor
    hides them from a job that asked for none; SLURM sets them per job), and the CPU cores
    shared out between the jobs running at once (each torch process would otherwise start a
    thread per core, and `jobs` of them would fight over the cores), unless OMP_NUM_THREADS is set."""
    changes = {"PYTHONUNBUFFERED": "1"}
    if cluster != "slurm":
        changes["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        if "OMP_NUM_THREADS" not in os.environ:
            changes["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return changes


def outcome_of(point, job):
    try:
        return Outcome(point, returncode=job.result())
    except Exception as err:  # the job itself died: killed, out of memory, past its time
        lines = str(err).strip().splitlines() or [type(err).__name__]
        return Outcome(point, error=f"job failed: {lines[0]}")


def run_here(submit, points, name, jobs):
    """Local and debug jobs, at most `jobs` at a time: a pool of threads, each waiting on one
    submitit job."""
    lock = threading.Lock()  # submitit's executor is not meant to be used from several threads at once
    submitted = []

    def one(point):
        with lock:
            job = submit(point)
            submitted.append(job)
        return outcome_of(point, job)

    outcomes = []
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = [pool.submit(one, point) for point in points]
        with progress(len(points), name) as bar:
            for future in concurrent.futures.as_completed(futures):
                outcomes.append(future.result())
                bar.update(1)
                bar.set_postfix(failed=sum(o.failed for o in outcomes))
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        with lock:
            for job in submitted:
                job.cancel(check=False)
        raise
    pool.shutdown()
    return outcomes


def run_array(executor, submit, points, name, no_wait):
    """SLURM: one job array; wait for it (unless no_wait) and return the outcomes."""
    with executor.batch():
        jobs = [submit(point) for point in points]
    array_id = jobs[0].job_id.split("_")[0]
    print(f"submitted SLURM job array {array_id} ({len(jobs)} points)")
    if no_wait:
        print("not waiting (--no_wait): run the same command again once the array has finished; "
              "points with results are skipped, failed ones run again")
        return None
    by_job = {job.job_id: point for job, point in zip(jobs, points)}
    outcomes = []
    with progress(len(jobs), name) as bar:
        for job in submitit.helpers.as_completed(jobs, poll_frequency=30):
            outcomes.append(outcome_of(by_job[job.job_id], job))
            bar.update(1)
            bar.set_postfix(failed=sum(o.failed for o in outcomes))
    return outcomes


def progress(total, name):
    return tqdm(total=total, desc=f"sweep {name}", unit="run", dynamic_ncols=True)


def summarize(outcomes, log_dir, skipped):
    """Print what ran and which points failed, with their logs; 1 if any failed, else 0."""
    failed = [o for o in outcomes if o.failed]
    print(f"{len(outcomes) - len(failed)} points ran, {len(failed)} failed, {skipped} skipped (already done)")
    for o in sorted(failed, key=lambda o: o.point.name):
        print(f"  failed: {o.point.name} ({o.describe()}), log: {log_path(log_dir, o.point)}")
    return 1 if failed else 0
