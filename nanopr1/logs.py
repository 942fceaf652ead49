"""The run's logs: a row per step in OUT/metrics.jsonl, the rollouts a step keeps in OUT/rollouts.jsonl
(and eval_rollouts.jsonl), and the same numbers to a tracker (--report-to). A resume cuts these files
back to its checkpoint's step (checkpoint.trim_logs)."""

from pathlib import Path

from nanopr1 import checkpoint, data


def start_trackers(acc, args):
    """--report-to: start the tracker with the run's flags (wandb: --project, --run-name)."""
    if args.report_to != "none":
        flags = {k: v for k, v in checkpoint.plain(args).items() if isinstance(v, (int, float, str, bool))}
        name = args.project if args.report_to == "wandb" else args.run_name
        acc.init_trackers(name, config=flags, init_kwargs={"wandb": {"name": args.run_name}})


def log_metrics(acc, out, row):
    """One step's row: appended to OUT/metrics.jsonl, and its numbers to the trackers if any."""
    append_rows(acc, Path(out) / "metrics.jsonl", [row])
    if acc.log_with:
        acc.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=row["step"])


def log_rollouts(acc, path, rows):
    """A step's kept rollouts: appended to `path`, and to the trackers (a table or text)."""
    append_rows(acc, path, rows)
    for tracker in acc.trackers if rows else []:
        if hasattr(tracker, "log_table"):
            table = [[str(v) for v in r.values()] for r in rows]
            tracker.log_table("rollouts", columns=list(rows[0]), data=table, step=rows[0]["step"])
        elif tracker.name == "tensorboard":
            text = "\n\n".join(f"    {r['response']}" for r in rows)  # indented: markdown code
            tracker.tracker.add_text("rollouts", text, rows[0]["step"])


def append_rows(acc, path, rows):
    """Append `rows` to the JSONL file `path` (the main process writes)."""
    if acc.is_main_process:
        data.write_rows(path, rows, "a")
