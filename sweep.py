"""Run a script over a grid of its flags: every point a separate process, through submitit.

    python sweep.py --script prune_bert.py --model_name bert-base-uncased --task_name mnli qqp \\
        --method stat magnitude --mu 0.4 0.5 0.6 --seed 0 1 2 --jobs 2
    python sweep.py --grid grids/glue-bert-base.yaml --cluster slurm --partition gpu --gpus_per_job 1 --time_min 120

Every flag of the script (prune_bert.py, prune_opt.py, quantize_opt.py, opt_eval.py) takes a
list of values here, and the sweep runs every combination; or a YAML/JSON grid file gives them
(--grid; see pipelines/grid.py). The grid is checked against the script's own flags before
anything runs. A point whose record (same script and flags) is already in the result file it
would append to is skipped unless --rerun, so an interrupted sweep resumes where it stopped.
Each point's output goes to <log_dir>/<name>/<point>.log; at the end the sweep lists the
points that failed and their logs, and exits with status 1 if any did.
"""
import sys

from pipelines import sweep
from pipelines.flags import parser
from utils.cli import positive_int, run_main


def parse_args(argv=None):
    """(the sweep's own flags, the grid's tokens: everything else on the command line)."""
    p = parser(__doc__)
    p.allow_abbrev = False  # an abbreviation must not swallow a flag of the grid
    p.add_argument("--script", help="the script to run: prune_bert.py, prune_opt.py, quantize_opt.py, opt_eval.py")
    p.add_argument("--grid", metavar="FILE", help="YAML or JSON grid file (the command line's lists take precedence)")
    p.add_argument("--name", help="the sweep's name, for its logs (default: the grid file's or the script's name)")
    p.add_argument("--cluster", choices=sweep.CLUSTERS, default="local",
                   help="local: processes on this machine; slurm: one job array; debug: one at a time, "
                        "waited on in this process")
    p.add_argument("--jobs", type=positive_int, help="local: points run at once (default 1)")
    p.add_argument("--time_min", type=positive_int, default=24 * 60, help="time limit of each point, in minutes")
    p.add_argument("--rerun", action="store_true", help="run points whose result is already written too")
    p.add_argument("--dry_run", action="store_true", help="print the grid and the commands; run nothing")
    p.add_argument("--log_dir", default="logs", help="logs go to <log_dir>/<name>/")
    slurm = p.add_argument_group("SLURM (--cluster slurm)")
    slurm.add_argument("--partition", help="partition of the jobs")
    slurm.add_argument("--gpus_per_job", type=positive_int, help="GPUs per point")
    slurm.add_argument("--cpus_per_job", type=positive_int, help="CPU cores per point")
    slurm.add_argument("--mem_gb", type=positive_int, help="memory per point, in GB")
    slurm.add_argument("--array_parallelism", type=positive_int, help="points running at once (default 256)")
    slurm.add_argument("--slurm_option", action="append", metavar="KEY=VALUE",
                       help="any other sbatch option, e.g. account=myproject or qos=high (repeatable)")
    slurm.add_argument("--no_wait", action="store_true",
                       help="submit the array and return; run the same command again later to resume")
    return p.parse_known_args(argv)


def main(argv=None):
    return sweep.run(*parse_args(argv))


if __name__ == "__main__":
    run_main(lambda: sys.exit(main()))
