"""Tables and plots from result records: mean ± std over seeds, the dense model alongside.

    python report.py output/bert-base-uncased                  # every .jsonl under the folder
    python report.py 'output/*/mnli.jsonl' --filter method=stat,kwon --latex table.tex --plot figures/
    python report.py output/opt --group_by wbits --plot figures/

One row per (model, protocol, method, μ) and any --group_by keys, one column per task and
metric (decoders: per evaluation set, perplexity); a cell is mean ± std (number of seeds). Runs
that differ in anything but the seed (flags, git commit, protocol, library versions, device)
are marked † and named below the table, never averaged silently. --plot writes one PNG and
one PDF per model: encoders' metric against the achieved MAC fraction, decoders' perplexity
(log scale) against μ, one line per method with a ±std band, the dense model dashed.
"""
import os

from pipelines import plots, report
from pipelines.flags import parser
from utils.atomic import atomic_file
from utils.cli import run_main
from utils.errors import UserError


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("paths", nargs="+", metavar="PATH", help="result .jsonl files, folders, or glob patterns")
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE[,VALUE...]",
                   help="keep records whose KEY is one of the values (repeatable; dots reach nested keys, "
                        "e.g. versions.torch; '-' matches a missing key)")
    p.add_argument("--group_by", nargs="+", default=[], metavar="KEY",
                   help="more row keys, e.g. allocation git_commit (records keep apart by them)")
    p.add_argument("--metrics", nargs="+", metavar="NAME", help="only these metrics (default: all)")
    p.add_argument("--fields", nargs="+", default=[], metavar="KEY",
                   help="record fields shown as more columns, mean ± std over seeds like the scores, e.g. "
                        "prune_seconds search.dense_passes measured.dense_passes (dots reach nested keys)")
    p.add_argument("--latex", metavar="FILE", help="also write the tables as LaTeX (booktabs) to FILE")
    p.add_argument("--plot", metavar="DIR", help="write a PNG and a PDF per model to DIR")
    p.add_argument("--plot_metric", metavar="NAME",
                   help="the metric encoder plots show (default: each task's main one)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    records = report.select(report.load_records(args.paths), [report.parse_filter(f) for f in args.filter])
    if not records:
        raise UserError("no record left after --filter" if args.filter else "the result files hold no record")
    for flag, keys in (("--group_by", args.group_by), ("--fields", args.fields)):
        for key in keys:
            if all(report.lookup(r, key) is None for r in records):
                raise UserError(f"{flag} {key}: no record has this key")
    tables, unscored = report.build_tables(records, args.group_by, args.metrics, args.fields)
    if not tables:
        raise UserError(f"none of the {len(records)} records holds scores")
    print("\n\n".join(report.markdown(t) for t in tables))
    if unscored:
        print(f"\n({unscored} records without scores were left out)")
    if args.latex:
        os.makedirs(os.path.dirname(os.path.abspath(args.latex)), exist_ok=True)
        with atomic_file(args.latex, "w", encoding="utf-8") as f:
            f.write("\n\n".join(report.latex(t) for t in tables) + "\n")
        print(f"\nLaTeX: {args.latex}")
    if args.plot:
        for table in tables:
            for stem, fig in plots.figures(table, args.plot_metric):
                print(f"plot: {', '.join(plots.save(fig, args.plot, stem))}")
    return tables


if __name__ == "__main__":
    run_main(main)
