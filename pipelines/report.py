"""Tables from result records (report.py): mean ± std over seeds, with the number of seeds, the
dense model alongside; one row per (model, protocol, method, μ) and any --group_by keys, one
column per task and metric (decoders: per evaluation set, perplexity), and one per record
field asked for (--fields: e.g. the prune time, a search's cost).

Runs are averaged only when they were asked for the same thing: a cell whose runs differ in
their flags (the seed and where results were written aside), code version (git commit,
uncommitted changes), protocol, library versions or device is marked and said in a note, never
averaged silently. A run repeated with the same seed counts once (the latest).
"""
import glob
import json
import os
import statistics
from typing import NamedTuple, Optional

from utils.cli import flag_pairs
from utils.errors import UserError

MISSING = "-"
ROW_KEYS = ("model_name", "protocol", "method", "mu")
HEADERS = {"model_name": "model", "mu": "μ"}
# Flags that do not change what a run computes, and flags already in a row's or column's key
NOT_SETTINGS = {"--seed", "--output_dir", "--save_model", "--device", "--model_name", "--task_name", "--method",
                "--mu", "--protocol"}
PROVENANCE = ("protocol", "git_commit", "git_dirty", "versions", "device")


# ---------------------------------------------------------------------------------------------
# Records


def result_files(paths):
    """The .jsonl files named by files, folders (searched recursively) or glob patterns."""
    files = []
    for path in paths:
        matches = [path] if os.path.exists(path) else sorted(glob.glob(path, recursive=True))
        if not matches:
            raise UserError(f"no result file matches {path}")
        for match in matches:
            if os.path.isdir(match):
                files += sorted(glob.glob(os.path.join(match, "**", "*.jsonl"), recursive=True))
            else:
                files.append(match)
    if not files:
        raise UserError(f"no .jsonl result file in {', '.join(paths)}")
    return list(dict.fromkeys(files))


def load_records(paths):
    records = []
    for path in result_files(paths):
        try:
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        record = json.loads(line)
                        if not isinstance(record, dict):
                            raise ValueError("not a JSON object")
                        records.append(record)
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read {path}: {err}")
        except ValueError as err:
            raise UserError(f"{path}, line {number}: not a result record ({err})")
    return records


def lookup(record, key):
    """record[key], with dots for nested keys (versions.torch); None when missing."""
    value = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def shown(value):
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def parse_filter(text):
    """('method', {'stat', 'kwon'}) from 'method=stat,kwon'."""
    key, sep, values = text.partition("=")
    if not sep or not key:
        raise UserError(f"--filter {text!r}: expected KEY=VALUE[,VALUE...] (e.g. method=stat,magnitude)")
    return key, set(values.split(","))


def matches(value, wanted):
    if shown(value) in wanted:
        return True
    try:  # 0.50 is 0.5
        return isinstance(value, (int, float)) and any(float(w) == value for w in wanted)
    except ValueError:
        return False


def select(records, filters):
    return [r for r in records if all(matches(lookup(r, key), wanted) for key, wanted in filters)]


class Run(NamedTuple):
    record: dict
    kind: str  # encoder or decoder
    scores: dict  # {(task, metric): value} of the model the run produced (none for a dense-only run)
    dense: dict  # {(task, metric): value} of the dense model


def run_of(record):
    """The scores of a record, or None for a record that has none."""
    metrics = record.get("metrics")
    if isinstance(metrics, dict) and "dense" in metrics:
        task = record.get("task_name", MISSING)

        def scores(d):  # counts (SQuAD's total, HasAns_total) are not scores
            return {(task, k): v for k, v in (d or {}).items() if _number(v) and not k.endswith("total")}

        return Run(record, "encoder", scores(metrics.get("pruned")), scores(metrics["dense"]))
    if isinstance(record.get("ppl_dense"), dict):
        final = record.get("ppl_quantized") or record.get("ppl_pruned")

        def ppl(d):
            return {(name, "ppl"): v for name, v in (d or {}).items() if _number(v)}

        return Run(record, "decoder", ppl(final), ppl(record["ppl_dense"]))
    return None


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------
# Cells: runs averaged over seeds


class Cell(NamedTuple):
    mean: float
    std: Optional[float]  # None for a single run
    n: int  # runs averaged (one per seed)
    mixed: Optional[str]  # what the runs differ in, when they were not asked for the same thing


def setting(record, flags=True):
    """What a run was asked for, the seed aside: how it was made and (with flags) its flags."""
    made = {key: shown(record.get(key)) for key in PROVENANCE}
    made["git_commit"] = made["git_commit"][:10]  # enough to tell commits apart in a note
    if not flags:
        return made
    return {**made, **{f: " ".join(v) if v else "on" for f, v in flag_pairs((record.get("argv") or [])[1:])
                       if f not in NOT_SETTINGS}}


def differences(records, flags=True):
    """'git_commit (0eaacbb, 1a2b3c4); --allocation (greedy, not given)' for what differs, or None."""
    settings = [setting(r, flags) for r in records]
    parts = []
    for key in dict.fromkeys(k for s in settings for k in s):
        values = sorted({s.get(key, "not given") for s in settings})
        if len(values) > 1:
            parts.append(f"{key} ({', '.join(values)})")
    return "; ".join(parts) or None


def latest_per_seed(pairs):
    """[(record, value)] with one entry per seed (the latest written), and how many were left out."""
    by_seed = {}
    for record, value in pairs:
        seed = shown(record.get("seed"))
        if seed not in by_seed or str(record.get("time", "")) >= str(by_seed[seed][0].get("time", "")):
            by_seed[seed] = (record, value)
    return list(by_seed.values()), len(pairs) - len(by_seed)


def aggregate(pairs, dense=False):
    """(Cell, number of repeated runs left out) from [(record, value)], or (None, 0).

    The dense model's score does not depend on the seed or on how the runs pruned: a dense
    cell averages every run's, and only their code, protocol, versions and device must agree.
    """
    if not pairs:
        return None, 0
    kept, repeated = (pairs, 0) if dense else latest_per_seed(pairs)
    values = [v for _, v in kept]
    std = statistics.stdev(values) if len(values) > 1 else None
    return Cell(statistics.fmean(values), std, len(values), differences([r for r, _ in kept], not dense)), repeated


# ---------------------------------------------------------------------------------------------
# Tables


class Row(NamedTuple):
    values: dict  # {row key: the record's value}; a dense row has method "dense" and μ None
    dense: bool
    macs: Optional[Cell]  # achieved fraction of the dense MACs, over all the row's runs
    cells: dict  # {(task, metric): Cell}
    task_macs: dict  # {task: Cell}: the achieved fraction of the runs on each task
    fields: dict  # {record field: Cell} of the numbers the row's runs hold there (none for a dense row)


class Table(NamedTuple):
    kind: str
    keys: tuple  # the row keys
    columns: list  # [(task, metric)]
    rows: list
    primary: dict  # {task: its main metric}, for plots
    repeated: int  # runs left out because a later run had the same seed
    fields: tuple = ()  # record fields shown as columns after the scores


def build_tables(records, group_by=(), metrics=None, fields=()):
    """One Table per kind of run present (encoder, decoder); the number of records left out
    because they hold no scores. fields: record keys (dots for nested ones) whose numbers are
    averaged over seeds like the scores, in columns of their own."""
    runs = [run_of(r) for r in records]
    tables = [build_table(kind, [r for r in runs if r and r.kind == kind], group_by, metrics, fields)
              for kind in ("encoder", "decoder") if any(r and r.kind == kind for r in runs)]
    return tables, sum(r is None for r in runs)


def build_table(kind, runs, group_by, metrics, fields=()):
    keys = tuple(dict.fromkeys(ROW_KEYS + tuple(group_by)))
    if kind == "decoder" and "wbits" not in keys and any(r.record.get("wbits") is not None for r in runs):
        keys += ("wbits",)
    columns = list(dict.fromkeys(c for r in runs for c in [*r.dense, *r.scores]))
    if metrics:
        columns = [c for c in columns if c[1] in metrics]
        if not columns:
            raise UserError(f"no {kind} record has the metrics {', '.join(metrics)}")
    primary = {}
    for r in runs:
        task = next(iter(r.dense), (MISSING,))[0]
        primary.setdefault(task, r.record.get("metric_name") or "ppl")

    def row_values(run, dense):
        values = {k: lookup(run.record, k) for k in keys}
        if dense:
            values.update(method="dense", mu=None, wbits=None)
        return {k: values[k] for k in keys}

    groups = {}  # (dense, shown key) -> (values, [runs])
    for run in runs:
        dense_only = not run.scores
        for dense in ((True,) if dense_only else (True, False)):
            values = row_values(run, dense)
            groups.setdefault((dense, tuple(shown(v) for v in values.values())), (values, []))[1].append(run)
    rows, repeated = [], 0
    for (dense, _), (values, members) in groups.items():
        cells = {}
        for column in columns:
            cell, left_out = aggregate([(r.record, (r.dense if dense else r.scores)[column]) for r in members
                                        if column in (r.dense if dense else r.scores)], dense)
            if cell is not None:
                cells[column] = cell
                repeated += left_out
        with_macs = [] if dense else [r for r in members if _number(r.record.get("mac_ratio"))]
        macs = aggregate([(r.record, r.record["mac_ratio"]) for r in with_macs])[0]
        task_macs = {}
        for task in dict.fromkeys(task for task, _ in columns):
            cell = aggregate([(r.record, r.record["mac_ratio"]) for r in with_macs
                              if any(c[0] == task for c in r.scores)])[0]
            if cell is not None:
                task_macs[task] = cell
        field_cells = {}
        for key in () if dense else fields:
            cell = aggregate([(r.record, lookup(r.record, key)) for r in members if _number(lookup(r.record, key))])[0]
            if cell is not None:
                field_cells[key] = cell
        rows.append(Row(values, dense, macs, cells, task_macs, field_cells))
    rows.sort(key=lambda row: _row_order(row, keys))
    return Table(kind, keys, columns, rows, primary, repeated, tuple(fields))


def _row_order(row, keys):
    def part(key):
        value = row.values[key]
        if key == "mu":
            return (0, -value) if _number(value) else (1, 0)
        return (0, str(value)) if value is not None else (1, "")

    order = [part(k) for k in keys if k not in ("method", "mu")]
    return (*order, not row.dense, part("method"), part("mu"), *[part(k) for k in keys])


# ---------------------------------------------------------------------------------------------
# Text


def number(value, like):
    """Accuracies and F1 fractions with 4 decimals; percentages and perplexities with 2."""
    return f"{value:.4f}" if abs(like) < 1.5 else f"{value:.2f}"


def cell_text(cell, dense, pm="±"):
    if cell is None:
        return MISSING
    if dense and not cell.std:  # the same checkpoint scored again
        return number(cell.mean, cell.mean)
    if cell.std is None:
        return f"{number(cell.mean, cell.mean)} (1)"
    return f"{number(cell.mean, cell.mean)} {pm} {number(cell.std, cell.mean)} ({cell.n})"


def column_title(column):
    task, metric = column
    return f"{task} {metric}"


def table_lines(table):
    """(header, [row cells as text], notes) shared by the Markdown and LaTeX forms."""
    header = [HEADERS.get(k, k) for k in table.keys] + ["MACs kept"] + [column_title(c) for c in table.columns]
    header += list(table.fields)
    notes, marks = {}, []
    body = []
    for row in table.rows:
        texts = [shown(v) for v in row.values.values()]
        texts.append("1.000" if row.dense else (f"{row.macs.mean:.3f}" if row.macs else MISSING))
        for column, title in [*((c, column_title(c)) for c in table.columns), *((f, f) for f in table.fields)]:
            cell = row.fields.get(column) if column in table.fields else row.cells.get(column)
            text = cell_text(cell, row.dense)
            if cell is not None and cell.mixed:
                where = f"{' '.join(t for t in texts[:len(table.keys)] if t != MISSING)}, {title}"
                notes.setdefault(cell.mixed, []).append(where)
                text += " †"
            texts.append(text)
        body.append(texts)
    lines = []
    for what, cells in notes.items():
        shown_cells = "; ".join(cells[:3]) + (f"; and {len(cells) - 3} more" if len(cells) > 3 else "")
        lines.append(f"† runs averaged together differ in {what}: {shown_cells} "
                     f"(split them with --group_by or --filter)")
    if table.repeated:
        lines.append(f"{table.repeated} run(s) repeated the seed of another run in their cell: the latest of "
                     f"each seed is counted")
    return header, body, lines


def markdown(table):
    header, body, notes = table_lines(table)
    numeric = len(table.keys)
    align = ["---"] * numeric + ["---:"] * (len(header) - numeric)
    lines = [_md_row(header), _md_row(align)] + [_md_row(r) for r in body]
    return "\n".join(lines + ([""] + notes if notes else []))


def _md_row(cells):
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def latex(table):
    header, body, notes = table_lines(table)
    columns = "l" * len(table.keys) + "r" * (len(header) - len(table.keys))
    lines = [f"% {table.kind}s: mean ± std over seeds (number of seeds)",
             f"\\begin{{tabular}}{{{columns}}}", "\\toprule",
             " & ".join(_tex(h) for h in header) + " \\\\", "\\midrule"]
    lines += [" & ".join(_tex(c) for c in row) + " \\\\" for row in body]
    lines += ["\\bottomrule", "\\end{tabular}"] + [f"% {_tex(n)}" for n in notes]
    return "\n".join(lines)


def _tex(text):
    for char, escaped in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("#", "\\#"), ("_", "\\_"),
                          ("{", "\\{"), ("}", "\\}"), ("$", "\\$")):
        text = text.replace(char, escaped)
    return (text.replace("±", "$\\pm$").replace("μ", "$\\mu$").replace("†", "$^\\dagger$")
            .replace("textbackslash\\{\\}", "textbackslash{}"))
