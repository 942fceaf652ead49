"""
eval.py: how often a model solves benchmark problems, and how often it thinks in parallel.

For each problem, n rollouts from the branching sampler (paper settings by default: temperature
1.0, top-p 1.0, a 3000-token response budget, 2 paths), graded by the accuracy function of RL
(nanopr1.rewards). Per dataset it prints Mean@n, Pass@k for k = 1, 2, 4, ..., n (unbiased), the
parallel rate (share of rollouts with at least one valid block), the format-valid rate and the
mean response length in tokens. Rollouts go to OUT/<dataset>.jsonl, the table to OUT/summary.json;
an interrupted run resumes from its JSONL files.

    python eval.py --preset toy                       # the newest toy model on toy-easy and toy-hard
    python eval.py --model Qwen/Qwen3-4B-Base --datasets aime25,aime24,amc23,math300 --n 16
    python eval.py --model out/rl-hard --data-dir ../shared/data     # local copies of the sets
    python eval.py --model out/rl-hard --no-parallel                 # sequential prompt and sampling

One process (no `accelerate launch`): on a GPU it picks cuda and bfloat16. train_rl.py calls
`evaluate` in-process for its --eval-every hook.

Simplifications relative to the paper:
1. The paper reports MATH300 as Mean@1; here --n applies to every dataset (`--datasets math300 --n 1`).
2. The grader is a small numeric normaliser (nanopr1/rewards.py), not math-verify.
3. Resuming assumes the same settings; a changed setting is refused (compare OUT/config.json).
"""

import argparse
import json
import sys
from math import comb
from pathlib import Path

import torch
from tqdm import tqdm

from nanopr1 import data, sampler
from nanopr1.format import PARALLEL_PROMPT, SEQUENTIAL_PROMPT, chat_prompt_ids, load_template
from nanopr1.rewards import reward_rollout

# -----------------------------------------------------------------------------
# metrics

def pass_at_k(n, c, k):
    """Unbiased Pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return 1.0 - comb(n - c, k) / comb(n, k)


def ks_for(n):
    """The k reported for n samples: powers of two below n, and n itself."""
    return sorted({2 ** i for i in range(n.bit_length()) if 2 ** i < n} | {n})


def _mean(xs):
    return sum(xs) / len(xs) if xs else 0.0


def summarize(rows, n):
    """One dataset's metrics from its graded rollout rows (n per problem)."""
    by_problem = {}
    for r in rows:
        by_problem.setdefault(r["problem"], []).append(r["correct"])
    counts = [(len(v), sum(v)) for v in by_problem.values()]  # (samples, correct) per problem
    s = {"problems": len(counts), "rollouts": len(rows), "n": n, f"mean@{n}": _mean([c / m for m, c in counts])}
    for k in ks_for(n):
        s[f"pass@{k}"] = _mean([pass_at_k(m, c, k) for m, c in counts])
    s["parallel"] = _mean([r["has_block"] for r in rows])   # share of rollouts with a valid block
    s["format_ok"] = _mean([r["format_ok"] for r in rows])
    s["length"] = _mean([r["length"] for r in rows])        # response tokens
    return s


def format_table(summaries):
    """{dataset: summary} -> a printable table: rates in %, length in tokens."""
    first = next(iter(summaries.values()), None)
    if first is None:
        return "(no datasets)"
    rates = [k for k in first if "@" in k] + ["parallel", "format_ok"]
    head = ["dataset", "problems"] + [{"parallel": "parallel%", "format_ok": "format%"}.get(k, k) for k in rates]
    lines = [head + ["length"]]
    for name, s in summaries.items():
        lines.append([name, str(s["problems"])] + [f"{100 * s[k]:.1f}" for k in rates] + [f"{s['length']:.0f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)

# -----------------------------------------------------------------------------
# sampling, grading, resuming

def grade_rollout(problem, index, sample_index, rollout):
    """One JSONL row: the rollout's text and its grade under R_acc."""
    _, m = reward_rollout(rollout, problem["answer"], "acc")
    return {"problem": index, "sample": sample_index, "question": problem["question"], "gold": problem["answer"],
            **{k: m[k] for k in ("answer", "correct", "has_block", "format_ok", "num_blocks")},
            "length": len(rollout.ids), "stop_reason": rollout.stop_reason, "text": rollout.text}


def complete_rows(rows, problems, n):
    """The rows of problems whose n rollouts are all present (a half-done problem is redone)."""
    by_problem = {}
    for r in rows:
        i = r["problem"]
        if i >= len(problems) or r["question"] != problems[i]["question"]:
            raise ValueError(f"rollout rows for problem {i} do not match this dataset: "
                             f"they were written for other problems, use another --out")
        if r["sample"] < n:
            by_problem.setdefault(i, {})[r["sample"]] = r
    return [r for i in sorted(by_problem) if len(by_problem[i]) == n
            for _, r in sorted(by_problem[i].items())]


@torch.no_grad()
def evaluate(model, tokenizer, problems, n=16, *, template=PARALLEL_PROMPT, parallel=True, batch_size=4,
             done=(), on_rows=None, progress=True, desc="eval", seed=None, **sampling):
    """Sample n rollouts per problem, grade them, return (rows, summary).

    `done`: rows of an earlier run (resume); complete problems are kept, the
    rest sampled. `on_rows(new_rows)` is called after each batch (eval.py
    appends them to the JSONL). `sampling`: keyword arguments of sampler.sample.
    """
    rows = complete_rows(list(done), problems, n)
    finished = {r["problem"] for r in rows}
    todo = [i for i in range(len(problems)) if i not in finished]
    was_training = model.training
    model.eval()
    with tqdm(total=len(problems), initial=len(finished), desc=desc, unit="problem", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            prompts = [chat_prompt_ids(tokenizer, template, problems[i]["question"]) for i in batch]
            rollouts = sampler.sample(model, tokenizer, prompts, group_size=n, parallel=parallel,
                                      seed=None if seed is None else seed + batch[0], **sampling)
            new = [grade_rollout(problems[i], i, j, rollouts[b * n + j]) for b, i in enumerate(batch) for j in range(n)]
            rows += new
            if on_rows is not None:
                on_rows(new)
            bar.update(len(batch))
    model.train(was_training)
    rows.sort(key=lambda r: (r["problem"], r["sample"]))
    return rows, summarize(rows, n)


def read_rows(path):
    """Rows of a rollout JSONL; a torn last line (the run was killed mid-write) is skipped."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").split("\n"):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def write_rows(path, rows, mode="w"):
    with open(path, mode, encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

# -----------------------------------------------------------------------------
# the script

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Mean@n / Pass@k / parallel rate on benchmark sets")
    p.add_argument("--preset", choices=["toy"], help="toy: the CPU toy world (toy model, toy-easy,toy-hard, n 4)")
    # model
    p.add_argument("--model", help="hub id or local dir; several, comma-separated, give one table "
                   "(toy preset: the newest of out/toy-*)")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: bfloat16 on cuda, else float32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variant", default="seen", choices=["seen", "unseen"], help="how paths are merged")
    # data
    p.add_argument("--datasets", default="aime25,aime24,amc23,math300", help="comma-separated names or files")
    p.add_argument("--data-dir", default=None, help="read the named sets from local files here (offline)")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems of each set")
    # sampling
    p.add_argument("--n", type=int, default=16, help="rollouts per problem (Mean@n, Pass@k up to n)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=3000, help="response budget (paths, summaries, answer)")
    p.add_argument("--num-paths", type=int, default=2, help="paths per parallel block")
    p.add_argument("--max-blocks", type=int, default=4, help="parallel blocks per rollout at most")
    p.add_argument("--no-parallel", action="store_true", help="sequential baseline: plain prompt, no forking")
    p.add_argument("--prompt-file", help="a prompt template with a {problem} slot")
    p.add_argument("--batch-size", type=int, default=4, help="problems per sampler call (x n rollouts)")
    p.add_argument("--seed", type=int, default=0)
    # output
    p.add_argument("--out", help="output directory (default out/eval/<model>[-sequential])")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    if p.parse_known_args(argv)[0].preset == "toy":
        from nanopr1 import toy
        p.set_defaults(datasets="toy-easy,toy-hard", n=4, max_new_tokens=toy.MAX_NEW_TOKENS, batch_size=16)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    template = SEQUENTIAL_PROMPT if args.no_parallel else PARALLEL_PROMPT
    if args.preset == "toy":
        from nanopr1 import toy
        template = toy.TEMPLATE  # the question alone: toy models learn the format in SFT
        args.model = toy.latest_model() if args.model is None else args.model
        if args.model is None:
            sys.exit("no toy model yet: run `python train_sft.py --preset toy` first")
    if args.model is None:
        sys.exit("error: --model is required (a hub id or a local directory)")
    sampling = dict(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                    num_paths=args.num_paths, max_blocks=args.max_blocks, variant=args.variant)
    try:  # the data first: a typo in --datasets should not wait for a 4B model to load
        template = load_template(args.prompt_file) if args.prompt_file else template
        # keyed by a short label (a file's stem); split "test" only matters for gsm8k
        sets = {Path(name).stem: data.load(name, split="test", data_dir=args.data_dir)
                for name in args.datasets.split(",")}
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    models = args.model.split(",")  # several models: one table, e.g. before/after a stage
    table = {}
    for model in models:
        prefix = Path(model.rstrip("/")).name + "/" if len(models) > 1 else ""
        summaries = evaluate_model(model, args, sets, template, sampling, several=len(models) > 1)
        table.update({prefix + k: v for k, v in summaries.items()})
    print(f"{args.model} ({'sequential' if args.no_parallel else 'parallel, ' + args.variant}), "
          f"n={args.n}, temperature {args.temperature}, budget {args.max_new_tokens} tokens")
    print(format_table(table))
    return table


def evaluate_model(model_path, args, sets, template, sampling, several=False):
    """Evaluate one model on every set; rollouts and summary.json go to its output dir."""
    name = Path(model_path.rstrip("/")).name + ("-sequential" if args.no_parallel else "")
    out = Path(args.out) / name if several and args.out else Path(args.out or Path("out/eval") / name)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    try:
        from nanopr1.model import load
        model, tokenizer = load(model_path, dtype, args.device)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")

    # refuse to resume a run made with other settings: its rollouts would be mixed with ours
    config = dict(model=model_path, template=template, parallel=not args.no_parallel, n=args.n, **sampling)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "config.json").is_file() and json.loads((out / "config.json").read_text()) != config:
        sys.exit(f"error: {out} holds a run with other settings (see {out / 'config.json'}); pass another --out")
    (out / "config.json").write_text(json.dumps(config, indent=1))

    summaries = {}
    for name, problems in sets.items():
        problems = problems[:args.limit]
        path = out / f"{name}.jsonl"
        try:
            done = complete_rows(read_rows(path), problems, args.n) if path.is_file() else []
        except ValueError as e:
            sys.exit(f"error: {path}: {e}")
        write_rows(path, done)  # drop a half-written problem before appending
        rows, summaries[name] = evaluate(
            model, tokenizer, problems, args.n, template=template, parallel=not args.no_parallel,
            batch_size=args.batch_size, done=done, on_rows=lambda new: write_rows(path, new, "a"),
            progress=not args.no_progress, desc=name, seed=args.seed, **sampling)
    (out / "summary.json").write_text(json.dumps({"config": config, "datasets": summaries}, indent=1))
    print(f"rollouts and summary.json in {out}", file=sys.stderr)
    return summaries


if __name__ == "__main__":
    main()
