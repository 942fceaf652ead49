"""Tests for plot.py: figures from fake run dirs and eval summaries (files, PNG sizes, the data
drawn), torn and repeated metrics.jsonl lines, smoothing, the message without matplotlib, and bad inputs
(missing runs, metrics no run logged, an --out that is a file) as one line."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")  # the [plot] extra; the [test] extra installs it

_spec = importlib.util.spec_from_file_location("nanopr1_plot", Path(__file__).resolve().parents[1] / "plot.py")
plot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot)

PNG = b"\x89PNG\r\n\x1a\n"
RUN_A = [dict(step=1, reward=0.1, accuracy=0.0, parallel_rate=0.5, first_block_pos=None, latency_ratio=1.0),
         dict(step=2, reward=0.3, accuracy=0.5, parallel_rate=1.0, first_block_pos=0.2, latency_ratio=1.5),
         dict(step=3, reward=0.5, accuracy=0.5, parallel_rate=1.0, first_block_pos=0.4, latency_ratio=2.0)]
RUN_B = [dict(step=1, reward=0.0, accuracy=0.0, parallel_rate=0.0, first_block_pos=None),  # no latency_ratio
         dict(step=2, reward=0.2, accuracy=0.25, parallel_rate=0.5, first_block_pos=0.5)]


def write_run(path, rows, tail=""):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return str(path)


@pytest.fixture
def runs(tmp_path):
    return [write_run(tmp_path / "run-a", RUN_A), write_run(tmp_path / "run-b", RUN_B, tail='{"step": 3, "rew')]


def test_runs_write_one_png_per_logged_metric(runs, tmp_path, capsys):
    from matplotlib.image import imread
    out = tmp_path / "plots"
    written = plot.main(runs + ["--out", str(out)])
    names = ["reward", "accuracy", "parallel_rate", "first_block_pos", "latency_ratio"]  # no run has the other two
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{m}.png" for m in names)
    assert capsys.readouterr().out.split() == [str(out / f"{m}.png") for m in names] == [str(p) for p in written]
    for m in names:
        assert (out / f"{m}.png").read_bytes()[:8] == PNG
        assert imread(out / f"{m}.png").shape == (400, 600, 4)  # figsize (6, 4) at 100 dpi, RGBA


def drawn(monkeypatch):
    """Keep the figures plot.py would save: {file name: figure}."""
    figs = {}
    monkeypatch.setattr(plot, "save_figure", lambda plt, fig, path: figs.setdefault(path.name, fig) and path)
    return figs


def test_runs_draw_each_run_smoothed(runs, tmp_path, monkeypatch):
    figs = drawn(monkeypatch)
    plot.main(runs + ["--labels", "seen,unseen", "--smooth", "2", "--out", str(tmp_path)])
    lines = {m: [(ln.get_label(), list(ln.get_xdata()), list(ln.get_ydata())) for ln in figs[f"{m}.png"].axes[0].lines]
             for m in ("reward", "first_block_pos", "latency_ratio")}
    assert lines["reward"] == [("seen", [1, 2, 3], [0.1, 0.2, 0.4]), ("unseen", [1, 2], [0.0, 0.1])]
    assert lines["first_block_pos"] == [("seen", [2, 3], [0.2, pytest.approx(0.3)]), ("unseen", [2], [0.5])]
    assert lines["latency_ratio"] == [("seen", [1, 2, 3], [1.0, 1.25, 1.75])]  # run-b never logged it


def test_eval_bars(tmp_path, monkeypatch):
    files = []
    for model, sets in {"sft": {"aime25": {"mean@4": 0.1, "pass@4": 0.3, "parallel": 0.2},
                                "amc23": {"mean@4": 0.4, "pass@4": 0.6, "parallel": 0.5}},
                        "rl": {"amc23": {"mean@8": 0.6, "parallel": 0.9}}}.items():
        (tmp_path / model).mkdir()
        (tmp_path / model / "summary.json").write_text(json.dumps({"config": {}, "datasets": sets}))
        files.append(str(tmp_path / model / "summary.json"))
    from matplotlib.image import imread
    written = plot.main(["--eval", *files, "--out", str(tmp_path / "plots")])
    assert [p.name for p in written] == ["eval.png"] and imread(written[0]).shape == (400, 1000, 4)
    figs = drawn(monkeypatch)
    plot.main(["--eval", *files, "--out", str(tmp_path / "plots")])
    bars = [{c.get_label(): [(round(b.get_x() + b.get_width() / 2, 6), b.get_height()) for b in c]
             for c in ax.containers} for ax in figs["eval.png"].axes]  # (bar centre, height); datasets at 0, 1
    assert bars == [{"sft": [(0.0, 0.1), (1.0, 0.4)], "rl": [(1.4, 0.6)]},   # accuracy: mean@n whatever n
                    {"sft": [(0.0, 0.2), (1.0, 0.5)], "rl": [(1.4, 0.9)]}]   # parallel


@pytest.mark.parametrize("text, want", [
    ('{"step": 1, "reward": 1}\n{"step": 2, "reward": 2}\n', {1: 1, 2: 2}),
    ('{"step": 1, "reward": 1}\n{"step": 2, "rew', {1: 1}),                                  # torn last line
    ('{"step": 1, "reward": 1}\n{"step": 2, "reward": 2}\n{"step": 2, "reward": 5}\n', {1: 1, 2: 5}),  # resumed
    ('{"step": 1, "rew\n{"step": 2, "reward": 2}\n', ValueError),                            # broken inside
])
def test_read_metrics(tmp_path, text, want):
    (tmp_path / "metrics.jsonl").write_text(text)
    if want is ValueError:
        with pytest.raises(ValueError, match="line 1"):
            plot.read_metrics(tmp_path)
    else:
        assert {s: r["reward"] for s, r in plot.read_metrics(tmp_path).items()} == want


@pytest.mark.parametrize("k, want", [(1, [1, 2, 3, 4]), (2, [1, 1.5, 2.5, 3.5]), (3, [1, 1.5, 2, 3]),
                                     (9, [1, 1.5, 2, 2.5])])
def test_smooth(k, want):
    assert plot.smooth([1, 2, 3, 4], k) == want


def test_without_matplotlib(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(SystemExit) as e:
        plot.main(runs + ["--out", str(tmp_path / "plots")])
    assert e.value.code == 'error: plotting needs matplotlib: pip install -e ".[plot]"'
    assert not (tmp_path / "plots").exists()


@pytest.mark.parametrize("case, message", [
    ("missing dir", "error: {tmp}/nope: no such directory (train_rl.py and train_sft.py write OUT/metrics.jsonl)"),
    ("empty dir", "error: {tmp}/empty: no metrics.jsonl in it (train_rl.py and train_sft.py write OUT/metrics.jsonl)"),
    ("bogus metric", "error: --metrics bogus: no run logged a value of it (logged: {logged})"),
    ("metric of no run", "error: --metrics path_diversity: no run logged a value of it (logged: {logged})"),
    ("nothing logged", "error: the runs logged none of reward, accuracy, parallel_rate, first_block_pos, "
                       "latency_ratio, blocks_per_rollout, path_diversity (logged: loss): choose with --metrics"),
    ("out is a file", "error: --out {tmp}/file: {tmp}/file is a file, not a directory"),
    ("out under a file", "error: --out {tmp}/file/plots: {tmp}/file is a file, not a directory"),
    ("broken metrics", "error: {tmp}/broken/metrics.jsonl line 1 is not JSON"),
    ("missing summary", "error: --eval {tmp}/none.json: not an eval.py summary.json (OUT/<model>/summary.json)"),
])
def test_bad_inputs_are_one_line_and_write_nothing(runs, tmp_path, monkeypatch, capsys, case, message):
    """Each: `error: <one line>` (exit status 1) before matplotlib loads, no PNG, no --out created."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # loading it would be an error of its own
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    write_run(tmp_path / "loss-only", [dict(step=1, loss=0.5)])
    write_run(tmp_path / "broken", [], tail='{"step": 1, "rew\n{"step": 2}\n')
    out = ["--out", str(tmp_path / "plots")]
    argv = {"missing dir": [str(tmp_path / "nope")] + out, "empty dir": [str(tmp_path / "empty")] + out,
            "bogus metric": runs + ["--metrics", "bogus"] + out,
            "metric of no run": runs + ["--metrics", "path_diversity,reward"] + out,
            "nothing logged": [str(tmp_path / "loss-only")] + out,
            "out is a file": runs + ["--out", str(tmp_path / "file")],
            "out under a file": runs + ["--out", str(tmp_path / "file" / "plots")],
            "broken metrics": [str(tmp_path / "broken")] + out,
            "missing summary": ["--eval", str(tmp_path / "none.json")] + out}[case]
    with pytest.raises(SystemExit) as e:
        plot.main(argv)
    logged = "accuracy, first_block_pos, latency_ratio, parallel_rate, reward"
    assert e.value.code == message.format(tmp=tmp_path, logged=logged)
    assert capsys.readouterr().out == "" and not (tmp_path / "plots").exists()
    assert (tmp_path / "file").read_text() == "x"


def test_a_run_without_an_asked_metric_is_said(runs, tmp_path, capsys):
    """Asked by name, a metric one run lacks is drawn from the others, and the lacking run is named."""
    written = plot.main(runs + ["--metrics", "latency_ratio", "--out", str(tmp_path / "plots")])
    captured = capsys.readouterr()
    assert [p.name for p in written] == ["latency_ratio.png"]
    assert captured.err == f"note: {runs[1]} has no latency_ratio\n"

