"""report.py on hand-made result records: means, stds and counts against numpy, the dense row,
protocols and code versions never averaged silently, LaTeX, filters, and plots checked
through matplotlib's objects."""
import json
import os

import numpy as np
import pytest

import report
from pipelines import plots
from pipelines.report import build_tables, latex, markdown
from utils.cli import run_main

# (method, mu): {seed: (pruned accuracy, achieved MAC ratio)}
SST2 = {
    ("stat", 0.5): {0: (0.80, 0.499), 1: (0.82, 0.500), 2: (0.83, 0.498)},
    ("stat", 0.3): {0: (0.70, 0.297), 1: (0.74, 0.300), 2: (0.69, 0.299)},
    ("magnitude", 0.5): {0: (0.60, 0.499), 1: (0.64, 0.500), 2: (0.59, 0.500)},
    ("magnitude", 0.3): {0: (0.51, 0.300), 1: (0.53, 0.299), 2: (0.50, 0.298)},
}
DENSE = 0.9


def encoder_record(method, mu, seed, acc, mac, task="sst2", dense=DENSE, protocol=None, commit="aaaa111",
                   time="2026-12-01T10:00:00", extra_flags=()):
    record = {
        "model_name": "tiny", "task_name": task, "method": method, "mu": mu, "mac_ratio": mac, "seed": seed,
        "metric_name": "accuracy", "dense_metric": dense, "pruned_metric": acc,
        "metrics": {"dense": {"accuracy": dense}, "pruned": {"accuracy": acc}},
        "device": "cpu", "time": time, "git_commit": commit, "git_dirty": False,
        "argv": ["prune_bert.py", "--model_name", "tiny", "--task_name", task, "--method", method, "--mu", str(mu),
                 "--seed", str(seed), *extra_flags],
        "versions": {"torch": "2.13.0"},
    }
    if protocol is not None:
        record["protocol"] = protocol
    return record


def decoder_record(method, mu, seed, ppl, dense, wbits=None):
    record = {"model_name": "tiny-opt", "task": "austen", "method": method, "mu": mu, "mac_ratio": mu - 0.01,
              "seed": seed, "ppl_dense": dense, "ppl_pruned": ppl, "device": "cpu", "git_commit": "aaaa111",
              "argv": ["prune_opt.py", "--model_name", "tiny-opt", "--mu", str(mu), "--seed", str(seed)]}
    if wbits is not None:
        record.update(wbits=wbits, ppl_quantized={k: 1.1 * v for k, v in ppl.items()})
    return record


def write(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def sst2_records(**kwargs):
    return [encoder_record(method, mu, seed, acc, mac, **kwargs)
            for (method, mu), runs in SST2.items() for seed, (acc, mac) in runs.items()]


def row(table, method, mu=None, **values):
    found = [r for r in table.rows if r.values["method"] == method and r.values["mu"] == mu
             and all(r.values[k] == v for k, v in values.items())]
    assert len(found) == 1, (method, mu, values, [r.values for r in table.rows])
    return found[0]


def test_mean_std_and_seed_count_of_every_cell():
    (table,), unscored = build_tables(sst2_records())
    assert unscored == 0 and table.kind == "encoder"
    assert table.keys == ("model_name", "protocol", "method", "mu") and table.columns == [("sst2", "accuracy")]
    for (method, mu), runs in SST2.items():
        accs = np.array([acc for acc, _ in runs.values()])
        macs = np.array([mac for _, mac in runs.values()])
        r = row(table, method, mu)
        cell = r.cells[("sst2", "accuracy")]
        assert cell.n == 3 and cell.mixed is None
        assert cell.mean == pytest.approx(accs.mean()) and cell.std == pytest.approx(accs.std(ddof=1))
        assert r.macs.mean == pytest.approx(macs.mean())
    dense = row(table, "dense")
    assert dense.dense and dense.cells[("sst2", "accuracy")].mean == pytest.approx(DENSE)
    assert dense.cells[("sst2", "accuracy")].n == 12  # every run scored the same dense model

    text = markdown(table).splitlines()
    assert text[0] == "| model | protocol | method | μ | MACs kept | sst2 accuracy |"
    accs = np.array([a for a, _ in SST2[("stat", 0.5)].values()])
    assert f"| tiny | - | stat | 0.5 | 0.499 | {accs.mean():.4f} ± {accs.std(ddof=1):.4f} (3) |" in text
    assert text[2] == "| tiny | - | dense | - | 1.000 | 0.9000 |"  # the dense row first
    methods = [line.split("|")[3].strip() for line in text[2:]]
    assert methods == ["dense", "magnitude", "magnitude", "stat", "stat"]
    assert [line.split("|")[4].strip() for line in text[3:5]] == ["0.5", "0.3"]  # μ from the largest down


def test_fields_are_columns_averaged_over_seeds_like_the_scores(tmp_path, capsys):
    """--fields: a record's numbers (nested ones by dots) averaged per row like the scores; a
    row whose runs lack the field, and the dense row, show a dash."""
    records = sst2_records()
    seconds = {}
    for i, r in enumerate(records):
        r["prune_seconds"] = 10.0 + 3 * i
        seconds.setdefault((r["method"], r["mu"]), []).append(r["prune_seconds"])
        if r["method"] == "stat":
            r["search"] = {"dense_passes": 2.0 + i}
    (table,), _ = build_tables(records, fields=("prune_seconds", "search.dense_passes"))
    for key, values in seconds.items():
        cell = row(table, *key).fields["prune_seconds"]
        assert (cell.mean, cell.std, cell.n) == (pytest.approx(np.mean(values)), pytest.approx(np.std(values, ddof=1)),
                                                 3)
    passes = [r["search"]["dense_passes"] for r in records if (r["method"], r["mu"]) == ("stat", 0.3)]
    assert row(table, "stat", 0.3).fields["search.dense_passes"].mean == pytest.approx(np.mean(passes))
    assert "search.dense_passes" not in row(table, "magnitude", 0.3).fields and not row(table, "dense").fields
    text = markdown(table).splitlines()
    assert text[0].endswith("| sst2 accuracy | prune_seconds | search.dense_passes |")
    assert text[2].endswith("| 0.9000 | - | - |")
    assert all(line.endswith("| - |") for line in text if "| magnitude |" in line)

    write(tmp_path / "r.jsonl", records)
    report.main([str(tmp_path / "r.jsonl"), "--fields", "prune_seconds"])
    assert "| sst2 accuracy | prune_seconds |" in capsys.readouterr().out


def test_protocols_are_rows_apart_and_a_record_without_protocol_shows_a_dash():
    records = sst2_records() + [encoder_record("stat", 0.5, s, 0.9 - 0.01 * s, 0.5, protocol="paper")
                                for s in (0, 1)]
    (table,), _ = build_tables(records)
    paper, old = row(table, "stat", 0.5, protocol="paper"), row(table, "stat", 0.5, protocol=None)
    assert paper.cells[("sst2", "accuracy")].n == 2 and old.cells[("sst2", "accuracy")].n == 3
    assert paper.cells[("sst2", "accuracy")].mean == pytest.approx(0.895)
    assert "| tiny | paper | stat | 0.5 |" in markdown(table)
    assert "| tiny | - | stat | 0.5 |" in markdown(table)


def test_runs_of_different_code_versions_are_marked_and_named_or_grouped_apart():
    records = sst2_records()
    records[0]["git_commit"] = "bbbb222"  # stat 0.5 seed 0 was made by other code
    (table,), _ = build_tables(records)
    cell = row(table, "stat", 0.5).cells[("sst2", "accuracy")]
    assert cell.n == 3 and "git_commit (aaaa111, bbbb222)" in cell.mixed
    assert row(table, "stat", 0.3).cells[("sst2", "accuracy")].mixed is None
    text = markdown(table)
    assert "(3) † |" in text
    assert ("† runs averaged together differ in git_commit (aaaa111, bbbb222): tiny dense, sst2 accuracy; "
            "tiny stat 0.5, sst2 accuracy (split them with --group_by or --filter)") in text

    (table,), _ = build_tables(records, group_by=["git_commit"])
    assert row(table, "stat", 0.5, git_commit="bbbb222").cells[("sst2", "accuracy")].n == 1
    assert row(table, "stat", 0.5, git_commit="aaaa111").cells[("sst2", "accuracy")].n == 2
    assert "†" not in markdown(table)


def test_runs_asked_for_different_flags_are_marked():
    records = sst2_records()
    records[3]["argv"] += ["--allocation", "uniform"]  # stat 0.3 seed 0
    (table,), _ = build_tables(records)
    assert row(table, "stat", 0.3).cells[("sst2", "accuracy")].mixed == "--allocation (not given, uniform)"
    # the dense model does not depend on how the runs pruned
    assert row(table, "dense").cells[("sst2", "accuracy")].mixed is None


def test_a_repeated_seed_counts_once_the_latest():
    records = sst2_records() + [encoder_record("stat", 0.5, 0, 0.10, 0.5, time="2026-12-02T10:00:00")]
    (table,), _ = build_tables(records)
    cell = row(table, "stat", 0.5).cells[("sst2", "accuracy")]
    assert cell.n == 3 and cell.mean == pytest.approx(np.mean([0.10, 0.82, 0.83]))
    assert table.repeated == 1 and "1 run(s) repeated the seed" in markdown(table)


def test_tasks_are_columns_and_filters_select_records(tmp_path, capsys):
    records = sst2_records() + [encoder_record("stat", 0.5, s, 0.7, 0.5, task="mrpc", dense=0.8) for s in (0, 1)]
    write(tmp_path / "out" / "tiny" / "all.jsonl", records)
    tables = report.main([str(tmp_path / "out"), "--filter", "method=stat", "--filter", "mu=0.50"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "| model | protocol | method | μ | MACs kept | sst2 accuracy | mrpc accuracy |"
    assert [line.split("|")[3].strip() for line in printed[2:4]] == ["dense", "stat"]
    assert len(printed) == 4
    assert printed[3].endswith("| 0.7000 ± 0.0000 (2) |") and printed[2].endswith("| 0.9000 | 0.8000 |")
    assert tables[0].rows[1].cells[("mrpc", "accuracy")].n == 2


def test_latex_is_written_with_escapes(tmp_path, capsys):
    path = write(tmp_path / "r.jsonl", sst2_records())
    report.main([path, "--latex", str(tmp_path / "tables" / "t.tex")])
    tex = (tmp_path / "tables" / "t.tex").read_text()
    assert "\\begin{tabular}{llllrr}" in tex and "\\toprule" in tex and "\\bottomrule" in tex
    assert "model & protocol & method & $\\mu$ & MACs kept & sst2 accuracy \\\\" in tex
    accs = np.array([a for a, _ in SST2[("magnitude", 0.3)].values()])
    assert f"tiny & - & magnitude & 0.3 & 0.299 & {accs.mean():.4f} $\\pm$ {accs.std(ddof=1):.4f} (3) \\\\" in tex
    assert tex.count("\\\\") == 6  # the header and five rows


def test_decoders_have_one_column_per_evaluation_set_and_quantized_runs_their_own_rows():
    records = [decoder_record("stat", mu, seed, {"wiki": 30 + 10 * (1 - mu) + seed, "austen": 20 + seed},
                              {"wiki": 25.0, "austen": 18.0}) for mu in (0.9, 0.7) for seed in (0, 1)]
    records.append(decoder_record("stat", 0.9, 0, {"wiki": 31.0, "austen": 21.0}, {"wiki": 25.0, "austen": 18.0},
                                  wbits=4))
    records.append({"model_name": "tiny-opt", "task": "austen", "method": "dense", "mu": 1.0, "seed": 0,
                    "ppl_dense": {"wiki": 25.0, "austen": 18.0}})  # opt_eval.py: dense only
    records.append({"model_name": "tiny-opt", "note": "no scores"})
    (table,), unscored = build_tables(records)
    assert unscored == 1 and table.kind == "decoder"
    assert table.keys[-1] == "wbits" and table.columns == [("wiki", "ppl"), ("austen", "ppl")]
    cell = row(table, "stat", 0.7, wbits=None).cells[("wiki", "ppl")]
    assert cell.n == 2 and cell.mean == pytest.approx(np.mean([33.0, 34.0]))
    quantized = row(table, "stat", 0.9, wbits=4).cells[("wiki", "ppl")]
    assert quantized.n == 1 and quantized.mean == pytest.approx(1.1 * 31.0)
    dense = row(table, "dense", wbits=None).cells[("austen", "ppl")]
    assert dense.mean == pytest.approx(18.0) and dense.n == 6
    assert len(table.rows) == 4  # dense, stat 0.9, stat 0.9 4-bit, stat 0.7
    assert "| tiny-opt | - | stat | 0.9 | 4 | 0.890 | 34.10 (1) | 23.10 (1) |" in markdown(table)


def test_encoder_plot_has_a_panel_per_task_a_line_per_method_and_the_dense_level():
    records = sst2_records() + [encoder_record("stat", mu, s, 0.6 + mu / 4, mu, task="mrpc", dense=0.8)
                                for mu in (0.3, 0.5) for s in (0, 1)]
    (table,), _ = build_tables(records)
    [(stem, fig)] = plots.figures(table)
    assert stem == "tiny-encoder"
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["sst2", "mrpc"]
    sst2, mrpc = axes
    assert sst2.get_xlabel() == "MACs kept (fraction of dense)" and sst2.get_ylabel() == "accuracy"
    assert len(sst2.get_lines()) == 3 and len(mrpc.get_lines()) == 2  # methods + the dense line
    lines = {line.get_label(): line for line in sst2.get_lines()}
    assert set(lines) == {"magnitude", "stat", "dense"}
    x, y = lines["stat"].get_data()
    expected = sorted((np.mean([m for _, m in SST2[("stat", mu)].values()]),
                       np.mean([a for a, _ in SST2[("stat", mu)].values()])) for mu in (0.3, 0.5))
    np.testing.assert_allclose(np.column_stack([x, y]), expected)
    assert list(lines["dense"].get_ydata()) == [DENSE, DENSE]
    assert len(sst2.collections) == 2  # a ±std band per method
    band = sst2.collections[1].get_paths()[0].vertices  # stat's: mean ± std at each point
    std_05 = np.std([a for a, _ in SST2[("stat", 0.5)].values()], ddof=1)
    assert band[:, 1].max() == pytest.approx(expected[1][1] + std_05)


def test_decoder_plot_is_perplexity_on_a_log_scale_against_mu(tmp_path):
    records = [decoder_record(method, mu, 0, {"wiki": 30 / mu, "austen": 20 / mu}, {"wiki": 25.0, "austen": 18.0})
               for method in ("stat", "magnitude") for mu in (0.9, 0.7, 0.5)]
    (table,), _ = build_tables(records)
    [(stem, fig)] = plots.figures(table)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["wiki", "austen"]
    for ax in axes:
        assert ax.get_yscale() == "log" and ax.get_ylabel() == "perplexity" and ax.get_xlabel().startswith("μ")
        assert len(ax.get_lines()) == 3
    x, y = [line for line in axes[0].get_lines() if line.get_label() == "stat"][0].get_data()
    np.testing.assert_allclose(x, [0.5, 0.7, 0.9])
    np.testing.assert_allclose(y, [60, 30 / 0.7, 30 / 0.9])
    paths = plots.save(fig, str(tmp_path / "figs"), stem)
    assert [os.path.basename(p) for p in paths] == ["tiny-opt-decoder.png", "tiny-opt-decoder.pdf"]
    assert open(paths[0], "rb").read(8) == b"\x89PNG\r\n\x1a\n" and open(paths[1], "rb").read(5) == b"%PDF-"


def test_report_writes_plots_from_the_command_line(tmp_path, capsys):
    path = write(tmp_path / "r.jsonl", sst2_records())
    report.main([str(tmp_path / "*.jsonl"), "--plot", str(tmp_path / "figs")])
    assert sorted(os.listdir(tmp_path / "figs")) == ["tiny-encoder.pdf", "tiny-encoder.png"]
    assert f"plot: {tmp_path / 'figs' / 'tiny-encoder.png'}" in capsys.readouterr().out
    assert os.path.exists(path)


@pytest.mark.parametrize("argv,expected", [
    (["{tmp}/nothing-here.jsonl"], "no result file matches"),
    (["{tmp}/empty"], "no .jsonl result file in"),
    (["{tmp}/bad.jsonl"], "bad.jsonl, line 2: not a result record"),
    (["{tmp}/r.jsonl", "--filter", "method"], "expected KEY=VALUE"),
    (["{tmp}/r.jsonl", "--filter", "method=kwon"], "no record left after --filter"),
    (["{tmp}/r.jsonl", "--metrics", "f1"], "no encoder record has the metrics f1"),
    (["{tmp}/r.jsonl", "--group_by", "alocation"], "--group_by alocation: no record has this key"),
    (["{tmp}/r.jsonl", "--fields", "prune_secs"], "--fields prune_secs: no record has this key"),
])
def test_bad_input_gives_one_line_and_exit_status_2(tmp_path, capsys, argv, expected):
    write(tmp_path / "r.jsonl", sst2_records())
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jsonl").write_text(json.dumps(sst2_records()[0]) + "\n{not json\n")
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: report.main([a.format(tmp=tmp_path) for a in argv]))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: ") and expected in err
