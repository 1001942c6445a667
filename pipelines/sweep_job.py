"""What one grid point of a sweep runs: the script as its own process, its output to a log.

Kept apart from pipelines/sweep.py, and on the standard library alone, because submitit's job
process (on this machine or on a cluster node) imports this module to unpickle the job: it
should start in milliseconds, not load torch only to start another process that loads it again.
"""
import os
import shlex
import socket
import subprocess
import time


def run_point(command, log_path, cwd, env_changes):
    """Run `command` in `cwd` with its stdout and stderr in `log_path`; the exit status.

    env_changes: variables to set for the command (a value of None unsets one).
    """
    env = dict(os.environ)
    for name, value in env_changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    start = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(command)}\n# on {socket.gethostname()} in {cwd}, "
                  f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        log.flush()
        returncode = subprocess.run(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        log.write(f"\n# exit status {returncode} after {time.time() - start:.1f} s\n")
    return returncode
