"""Plots of report tables (report.py --plot), one figure per model, with matplotlib.

Encoders: each task's main metric against the achieved fraction of dense MACs, one panel per
task, one line per method (and protocol, and --group_by values) with a ±std band over seeds,
the dense model as a dashed horizontal line. Decoders: perplexity (log scale) against μ, one
panel per evaluation set, the same lines.
"""
import math
import os
import re

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from pipelines.report import MISSING, shown
from utils.atomic import atomic_file

PANELS_PER_ROW = 4


def figures(table, metric=None):
    """[(file stem, Figure)]: one figure per model of the table."""
    out = []
    for model in dict.fromkeys(row.values["model_name"] for row in table.rows):
        rows = [row for row in table.rows if row.values["model_name"] == model]
        out.append((_file_stem(model, table.kind), figure(table, rows, model, metric)))
    return out


def panels(table, rows, metric):
    """[(title, column)] of the panels: each task's main metric (or `metric`), or each
    evaluation set's perplexity."""
    present = [c for c in table.columns if any(c in row.cells for row in rows)]
    if table.kind == "decoder":
        return [(task, (task, m)) for task, m in present]
    out = []
    for task in dict.fromkeys(task for task, _ in present):
        wanted = metric or table.primary.get(task)
        column = next((c for c in present if c == (task, wanted)), None)
        if column is not None:
            out.append((task, column))
    return out


def line_label(row, table):
    """The method, then whatever else tells the row's line apart (protocol, --group_by keys)."""
    extra = [f"{k} {shown(row.values[k])}" for k in table.keys
             if k not in ("model_name", "method", "mu") and row.values[k] is not None]
    return " ".join([str(row.values["method"])] + ([f"({', '.join(extra)})"] if extra else []))


def figure(table, rows, model, metric=None):
    chosen = panels(table, rows, metric)
    if not chosen:
        raise ValueError(f"nothing to plot for {model}")
    ncols = min(len(chosen), PANELS_PER_ROW)
    nrows = math.ceil(len(chosen) / ncols)
    fig = Figure(figsize=(3.6 * ncols, 3.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax in axes[len(chosen):]:
        ax.set_visible(False)
    decoder = table.kind == "decoder"
    # one colour per line in every panel
    labels = list(dict.fromkeys(line_label(row, table) for row in rows if not row.dense))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    for ax, (title, column) in zip(axes, chosen):
        levels = []  # every y drawn, bands included, so that the limits take in the dense line too
        lines = {}
        for row in rows:
            if not row.dense and column in row.cells:
                lines.setdefault(line_label(row, table), []).append(row)
        for label, members in lines.items():
            points = sorted((_x(row, column, decoder), row.cells[column]) for row in members
                            if _x(row, column, decoder) is not None)
            if not points:
                continue
            xs = [x for x, _ in points]
            means = [c.mean for _, c in points]
            stds = [c.std or 0.0 for _, c in points]
            ax.plot(xs, means, marker="o", markersize=3, label=label, color=colors[label])
            low, high = [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)]
            ax.fill_between(xs, low, high, color=colors[label], alpha=0.2, linewidth=0)
            levels += low + high
        for row in rows:
            if row.dense and column in row.cells:
                label = line_label(row, table)
                ax.axhline(row.cells[column].mean, color="0.3", linestyle="--", linewidth=1, label=label)
                levels.append(row.cells[column].mean)
        _pad(ax, levels, decoder)
        ax.set_title(f"{model}: {title}" if len(chosen) == 1 else title)
        ax.set_xlabel("μ (fraction of MACs kept, target)" if decoder else "MACs kept (fraction of dense)")
        ax.set_ylabel("perplexity" if decoder else column[1])
        if decoder:
            ax.set_yscale("log")
            plain = FuncFormatter(lambda y, _: f"{y:g}")  # 30, not 3 × 10¹
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    if len(chosen) > 1:
        fig.suptitle(model)
    return fig


def _pad(ax, levels, log):
    """y limits 5 % beyond everything drawn (on a log scale, 5 % of the decades)."""
    levels = [y for y in levels if y > 0] if log else levels
    if not levels:
        return
    low, high = min(levels), max(levels)
    if log:
        low, high = math.log10(low), math.log10(high)
    margin = 0.05 * (high - low) or 0.05 * (abs(high) or 1)
    low, high = low - margin, high + margin
    ax.set_ylim(10 ** low if log else low, 10 ** high if log else high)


def _x(row, column, decoder):
    """Decoders: the target μ; encoders: the achieved MAC fraction on the task (mean over seeds)."""
    if decoder:
        return row.values["mu"] if isinstance(row.values["mu"], (int, float)) else None
    macs = row.task_macs.get(column[0])
    return macs.mean if macs is not None else None


def _file_stem(model, kind):
    name = re.sub(r"[^A-Za-z0-9._-]", "-", shown(model) if model is not None else MISSING)
    return f"{name}-{kind}"


def save(fig, folder, stem):
    """Write <folder>/<stem>.png and .pdf; their paths."""
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"{stem}.{ext}") for ext in ("png", "pdf")]
    for path in paths:
        with atomic_file(path, "wb") as f:  # never a half-drawn figure (utils/atomic.py)
            fig.savefig(f, dpi=110, format=os.path.splitext(path)[1][1:])
    return paths
