"""A sweep's grid: lists of flag values for one run script, from the command line or a
YAML/JSON file, checked against the script's own parser, expanded into points (one run each),
and matched against the results already written, so that a sweep can resume.

On the command line every flag takes a list: `--mu 0.4 0.5 --seed 0 1 2` is six points. A grid
file says the same, and may give a list of grids (their union):

    script: prune_bert.py
    grid:
      model_name: all-minilm-l6-v2
      task_name: movie-sentiment
      method: [stat, magnitude]
      mu: [0.3, 0.5]
      seed: [0, 1, 2]

A switch (a flag without a value, like --sym) takes true/false; on the command line it alone
means true. A flag that itself takes several values takes one list per point: on the command
line all its values are one point; in a file, a list of lists is one point per inner list.
"""
import contextlib
import hashlib
import io
import itertools
import json
import os
import re
from typing import NamedTuple

import yaml

from pipelines.commands import COMMANDS, parse
from utils.cli import flag_pairs, is_flag
from utils.errors import UserError
from utils.results import read_jsonl

FILE_KEYS = ("script", "grid")


class Sweep(NamedTuple):
    script: str
    grids: list  # [{flag: [value, ...]}, ...], checked
    points: list  # [Point, ...]


class Point(NamedTuple):
    name: str  # unique within the sweep, from the flags that vary: names the point's log
    script: str  # e.g. prune_bert.py
    flags: tuple  # the script's arguments
    results: str  # the .jsonl file the run appends its record to


# ---------------------------------------------------------------------------------------------
# Reading a grid


def check_script(script):
    if not script:
        raise UserError("no script to sweep: give --script, or 'script:' in the grid file")
    if not isinstance(script, str):
        raise UserError(f"the script to sweep must be a file name, got {script!r}")
    name = os.path.basename(script)
    if name not in COMMANDS:
        raise UserError(f"unknown script {script!r} (sweep.py runs: {', '.join(COMMANDS)})")
    return name


def tokens_to_grid(tokens):
    """{flag: [raw values]} from command-line tokens `--mu 0.4 0.5 --sym --model_dir=D`, in order.
    A flag with no value gets [] (a switch, or an empty list that check_grid rejects)."""
    grid = {}
    flag = None
    for token in tokens:
        if is_flag(token):
            flag, _, value = token.lstrip("-").partition("=")
            if not flag:
                raise UserError(f"bad flag {token!r} in the grid")
            if flag in grid:
                raise UserError(f"--{flag} is given twice in the grid")
            grid[flag] = [value] if value else []
        elif flag is None:
            raise UserError(f"{token!r} in the grid is not a flag's value (flags start with --)")
        else:
            grid[flag].append(token)
    return grid


def read_grid_file(path):
    """(script or None, [grid, ...]) from a YAML or JSON file; each grid is {flag: value or list}."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        content = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        raise UserError(f"cannot read the grid file {path}: {' '.join(str(err).split())}")
    if not isinstance(content, dict) or "grid" not in content:
        raise UserError(f"grid file {path}: expected a mapping with the keys 'script' and 'grid'")
    unknown = sorted(set(content) - set(FILE_KEYS))
    if unknown:
        raise UserError(f"grid file {path}: unknown key {unknown[0]!r} (known: {', '.join(FILE_KEYS)})")
    grids = content["grid"]
    grids = [grids] if isinstance(grids, dict) else grids
    if not isinstance(grids, list) or not grids or not all(isinstance(g, dict) and g for g in grids):
        raise UserError(f"grid file {path}: 'grid' must be a mapping of flags to values, or a list of them")
    return content.get("script"), [{str(flag).lstrip("-"): values for flag, values in g.items()} for g in grids]


# ---------------------------------------------------------------------------------------------
# Checking a grid against the script's parser


def flag_actions(script):
    """{flag name: argparse action} of the script's long options."""
    actions = {}
    for action in COMMANDS[script].parser()._actions:
        for option in action.option_strings:
            if option.startswith("--"):
                actions[option[2:]] = action
    return actions


def check_grid(script, grid, from_file):
    """The grid with every flag known to the script and every list of values checked: {flag:
    [value, ...]} where a value is a string, True/False (a switch) or a tuple (a multi-value flag)."""
    actions = flag_actions(script)
    checked = {}
    for flag, values in grid.items():
        action = actions.get(flag)
        if action is None or flag == "help":
            raise UserError(f"{script} has no flag --{flag}")
        checked[flag] = _values(flag, values, action, from_file)
    return checked


def _values(flag, values, action, from_file):
    if action.nargs == 0:  # a switch
        if not from_file and values == []:
            return [True]
        values = values if isinstance(values, list) else [values]
        switches = [_switch(flag, v) for v in values]
        if not switches:
            raise UserError(f"--{flag}: empty list of values")
        return switches
    many = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1)
    if many:
        if not from_file:
            points = [values]
        elif isinstance(values, list) and values and all(isinstance(v, list) for v in values):
            points = values
        else:
            points = [values if isinstance(values, list) else [values]]
        points = [tuple(_scalar(flag, v) for v in p) for p in points]
        if not points or not all(points):
            raise UserError(f"--{flag}: empty list of values")
        return points
    values = values if isinstance(values, list) else [values]
    if not values:
        raise UserError(f"--{flag}: empty list of values")
    return [_scalar(flag, v) for v in values]


def _switch(flag, value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise UserError(f"--{flag} is a switch: its values are true or false, got {value!r}")


def _scalar(flag, value):
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UserError(f"--{flag}: expected a string or a number, got {value!r}")
    return str(value)


# ---------------------------------------------------------------------------------------------
# Points


def expand(script, grids):
    """Every point of the union of the grids, in order (the last flag varies fastest), once each.

    Each point is checked with the script's own parser, so a bad value or a missing required
    flag fails here, before anything runs.
    """
    argvs, seen = [], set()
    for grid in grids:
        flags = list(grid)
        for combination in itertools.product(*(grid[f] for f in flags)):
            argv = tuple(token for flag, value in zip(flags, combination) for token in _tokens(flag, value))
            if normalised(argv) not in seen:
                seen.add(normalised(argv))
                argvs.append(argv)
    names = point_names(argvs)
    points = []
    for name, argv in zip(names, argvs):
        args = parse_quietly(script, argv, name)
        points.append(Point(name, script, argv, COMMANDS[script].result_stem(args) + ".jsonl"))
    return points


def _tokens(flag, value):
    if value is True:
        return [f"--{flag}"]
    if value is False:
        return []
    if isinstance(value, tuple):
        return [f"--{flag}", *value]
    return [f"--{flag}", value]


def parse_quietly(script, argv, name):
    """The script's parsed flags; its one-line error as a UserError naming the point."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            return parse(script, list(argv))
    except SystemExit:
        message = stderr.getvalue().strip().removeprefix("error: ") or "bad flags"
        raise UserError(f"point {name}: {message.splitlines()[-1]}")


def point_names(argvs):
    """A readable, file-safe name per point, from the flags whose values differ across points
    (e.g. `method=stat_mu=0.5_seed=1`); a short hash makes it unique where needed."""
    pairs = [dict(flag_pairs(argv)) for argv in argvs]
    flags = []
    for p in pairs:
        flags += [f for f in p if f not in flags]
    varying = [f for f in flags if len({p.get(f, "-") for p in pairs}) > 1]
    switches = {f for f in varying if all(p.get(f) is None for p in pairs)}
    names = []
    for argv, p in zip(argvs, pairs):
        parts = [f"{f.lstrip('-')}={_show(p[f]) if f in p else 'false' if f in switches else '-'}" for f in varying]
        name = re.sub(r"[^A-Za-z0-9._=+-]", "-", "_".join(parts)) or "point"
        names.append(name[:120] + "-" + _digest(argv) if len(name) > 120 else name)
    for i, name in enumerate(names):
        if names.count(name) > 1:
            names[i] = f"{name}-{_digest(argvs[i])}"
    return names


def _show(value):
    if value is None:
        return "true"
    return "+".join(value)


def _digest(argv):
    return hashlib.sha1("\0".join(argv).encode()).hexdigest()[:8]


# ---------------------------------------------------------------------------------------------
# Resuming


def normalised(argv):
    """The same run whatever the order of its flags."""
    return frozenset(flag_pairs(argv))


def done_runs(path):
    """The (script, normalised flags) of every record in a result file that says its argv."""
    if not os.path.exists(path):
        return set()
    try:
        records = read_jsonl(path)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"cannot read the results in {path}: {err}")
    return {(os.path.basename(r["argv"][0]), normalised(r["argv"][1:]))
            for r in records if isinstance(r, dict) and isinstance(r.get("argv"), list) and r["argv"]}


def split_done(points):
    """(points still to run, points whose result is already written)."""
    done_by_file = {}
    todo, done = [], []
    for point in points:
        if point.results not in done_by_file:
            done_by_file[point.results] = done_runs(point.results)
        key = (point.script, normalised(point.flags))
        (done if key in done_by_file[point.results] else todo).append(point)
    return todo, done


def build(script, tokens, grid_file=None):
    """The Sweep of a script (or the grid file's) over the command-line grid tokens and/or the
    grid file's grids (the command line's lists replace the file's for the same flag)."""
    grids = [{}]
    if grid_file:
        file_script, grids = read_grid_file(grid_file)
        script = script or file_script
    script = check_script(script)
    cli = check_grid(script, tokens_to_grid(tokens), from_file=False)
    grids = [{**check_grid(script, g, from_file=True), **cli} for g in grids]
    if not any(grids):
        raise UserError("the grid is empty: give the script's flags, each with a list of values")
    return Sweep(script, grids, expand(script, grids))
