"""
plot.py: PNG figures of RL runs (curves) and of eval results (bar charts).

    python plot.py out/rl-seen out/rl-unseen --labels seen,unseen --smooth 5 --out plots
    python plot.py --eval out/eval/*/summary.json --out plots

Simplifications: a fixed list of metrics; --smooth is a trailing moving average, not an EMA.
A missing run or file, a metric no run logged, or an --out that is a file: one line, nothing written.
"""

import argparse
import json
import sys
from pathlib import Path

METRICS = ["reward", "accuracy", "parallel_rate", "first_block_pos", "latency_ratio",
           "blocks_per_rollout", "path_diversity"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    arg = parser.add_argument
    arg("runs", nargs="*", metavar="RUN_DIR", help="run dirs holding metrics.jsonl")
    arg("--labels", help="comma-separated legend names, one per RUN_DIR (default: the dir names)")
    arg("--smooth", type=int, default=1, metavar="K", help="moving average over the last K steps")
    arg("--metrics", help="comma-separated metrics.jsonl keys to plot (default: those of "
        f"{', '.join(METRICS)} the runs logged)")
    arg("--together", metavar="NAME", help="the metrics as panels of one figure, OUT/NAME.png")
    arg("--eval", nargs="+", default=[], metavar="SUMMARY", help="eval.py summary.json files")
    arg("--out", required=True, help="directory for the PNG files")
    args = parser.parse_args(argv)
    if not args.runs and not args.eval:
        parser.error("give at least one RUN_DIR or --eval file")
    args.labels = args.labels.split(",") if args.labels else [Path(r).name for r in args.runs]
    if len(args.labels) != len(args.runs):
        parser.error(f"--labels has {len(args.labels)} names for {len(args.runs)} run dirs")
    if args.smooth < 1:
        parser.error("--smooth K needs K >= 1")
    # an --out that is (or lies under) a file: one line now, not after the figures are drawn
    found = next(p for p in [Path(args.out), *Path(args.out).parents] if p.exists())  # "." at worst
    if not found.is_dir():
        sys.exit(f"error: --out {args.out}: {found} is a file, not a directory")
    return args


def read_inputs(args):
    """(runs, metrics): {step: row} of each run and the metrics to draw; `error: ...` if one is missing."""
    runs = []
    for run_dir in args.runs:
        if not (Path(run_dir) / "metrics.jsonl").is_file():
            what = "no such directory" if not Path(run_dir).is_dir() else "no metrics.jsonl in it"
            sys.exit(f"error: {run_dir}: {what} (train_rl.py and train_sft.py write OUT/metrics.jsonl)")
        try:
            runs.append(read_metrics(run_dir))
        except ValueError as e:
            sys.exit(f"error: {e}")
    # the metrics each run has a value of; what the runs logged, for a message
    logged = [{k for r in rows.values() for k, v in r.items() if v is not None} for rows in runs]
    anywhere = set().union(*logged)
    have = ", ".join(sorted({k for rows in runs for r in rows.values() for k, v in r.items()
                             if isinstance(v, (int, float)) and k != "step"})) or "nothing yet"
    metrics = args.metrics.split(",") if args.metrics else [m for m in METRICS if m in anywhere]
    # a metric asked by name must be drawn from some run; a run that lacks it is named
    missing = [m for m in metrics if m not in anywhere]
    if runs and missing:
        sys.exit(f"error: --metrics {','.join(missing)}: no run logged a value of it (logged: {have})")
    if runs and not metrics:
        sys.exit(f"error: the runs logged none of {', '.join(METRICS)} (logged: {have}): "
                 "choose with --metrics")
    for m in metrics:
        for run_dir, keys in zip(args.runs, logged):
            if args.metrics and m not in keys:
                print(f"note: {run_dir} has no {m}", file=sys.stderr)
    for f in args.eval:
        try:
            json.loads(Path(f).read_text())["datasets"]
        except (OSError, ValueError, KeyError, TypeError):
            sys.exit(f"error: --eval {f}: not an eval.py summary.json (OUT/<model>/summary.json)")
    return runs, metrics


def read_metrics(run_dir):
    """{step: row} from run_dir/metrics.jsonl; a step logged twice (a resumed run): its last row."""
    text = (Path(run_dir) / "metrics.jsonl").read_text()
    rows, lines = {}, [line for line in text.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # torn last line: the run was killed while writing it
            raise ValueError(f"{run_dir}/metrics.jsonl line {i + 1} is not JSON")
        rows[row["step"]] = row
    return rows


def smooth(ys, k):
    """Trailing moving average: point i is the mean of ys[i-k+1..i] (fewer points at the start)."""
    return [sum(w) / len(w) for w in (ys[max(0, i - k + 1):i + 1] for i in range(len(ys)))]


def plot_runs(plt, runs, labels, k, out, metrics, together):
    """Writes OUT/<metric>.png per logged metric, a line per run (or one OUT/<together>.png)."""
    # each metric's panel holds the runs that logged it, at the steps they did (None: no block yet)
    panels = {}  # {metric: [(label, rows, steps)]}
    for metric in metrics:
        for rows, label in zip(runs, labels):
            steps = sorted(s for s, r in rows.items() if r.get(metric) is not None)
            if steps:
                panels.setdefault(metric, []).append((label, rows, steps))
    # a figure per metric, or with --together one figure of all the panels side by side
    figures = {together: list(panels)} if together and panels else {m: [m] for m in panels}
    smoothed = f" (moving average of {k})" if k > 1 else ""
    for name, group in figures.items():
        fig, axes = plt.subplots(1, len(group), figsize=(6 * len(group), 4), layout="tight",
                                 squeeze=False)
        for ax, metric in zip(axes[0], group):
            for label, rows, steps in panels[metric]:
                ax.plot(steps, smooth([rows[s][metric] for s in steps], k), label=label)
            ax.set(xlabel="step", ylabel=metric, title=metric + smoothed)
            ax.grid(alpha=0.3)
            ax.legend()
        save_figure(plt, fig, out / f"{name}.png")
    return [out / f"{name}.png" for name in figures]


def plot_eval(plt, files, out):
    """Accuracy (mean@n) and parallel rate: a bar per model and dataset; returns [the PNG file]."""
    models = {Path(f).parent.name: json.loads(Path(f).read_text())["datasets"] for f in files}
    datasets = list(dict.fromkeys(d for sets in models.values() for d in sets))  # first-seen order
    graders = sorted({s["grader"] for sets in models.values() for s in sets.values() if "grader" in s})
    by = f", {' / '.join(graders)}" if graders else ""  # eval.py's --grader (not the lenient one)
    panels = [(f"accuracy (mean@n{by})", lambda s: s[next(k for k in s if k.startswith("mean@"))]),
              ("parallel (share of rollouts with a block)", lambda s: s["parallel"])]
    # a group of bars per dataset, a bar per model in it (a model may lack a dataset)
    width = 0.8 / len(models)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="tight")
    for ax, (title, value) in zip(axes, panels):
        for j, (model, sets) in enumerate(models.items()):
            have = [i for i, d in enumerate(datasets) if d in sets]
            bars = [value(sets[datasets[i]]) for i in have]
            ax.bar([i + j * width for i in have], bars, width, label=model)
        ax.set_xticks([i + (len(models) - 1) * width / 2 for i in range(len(datasets))], datasets)
        ax.set(title=title, ylim=(0, 1))
        ax.legend()
    return [save_figure(plt, fig, out / "eval.png")]


def save_figure(plt, fig, path):
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):
    args = parse_args(argv)
    runs, metrics = read_inputs(args)  # every input checked before matplotlib loads
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit('error: plotting needs matplotlib: pip install -e ".[plot]"')
    plt.switch_backend("Agg")  # files only, no window
    # the runs' curves, then the eval results' bars; each file written is printed on a line
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = plot_runs(plt, runs, args.labels, args.smooth, out, metrics, args.together)
    written += plot_eval(plt, args.eval, out) if args.eval else []
    sys.stdout.writelines(f"{path}\n" for path in written)
    return written


if __name__ == "__main__":
    main()
