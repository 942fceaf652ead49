"""
Evaluation: n rollouts per problem from the branching sampler, graded like RL, summarised as
Mean@n, Pass@k (unbiased), parallel rate, format-valid rate and response length. eval.py (the
benchmark table) and train_rl.py (--eval-every) both call `evaluate`; how the ranks share the
problems and why a problem's rollouts do not depend on it: docs/design.md, "Evaluation".
"""

from collections import namedtuple
from math import comb

import torch
from tqdm import tqdm

from nanopr1 import metrics, sampler
from nanopr1.format import PARALLEL_PROMPT, chat_prompt_ids
from nanopr1.rewards import reward_rollout
from nanopr1.rollout import mix

Difference = namedtuple("Difference", "mean stderr")  # paired_difference()

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


def _by_problem(rows, key):
    """{problem: [r[key] of its rows]}, rows in order."""
    found = {}
    for r in rows:
        found.setdefault(r["problem"], []).append(r[key])
    return found


def summarize(rows, n):
    """One dataset's metrics from its graded rollout rows (n per problem)."""
    counts = [(len(v), sum(v)) for v in _by_problem(rows, "correct").values()]  # (samples, correct)
    s = {"problems": len(counts), "rollouts": len(rows), "n": n,
         f"mean@{n}": _mean([c / m for m, c in counts])}
    for k in ks_for(n):
        s[f"pass@{k}"] = _mean([pass_at_k(m, c, k) for m, c in counts])
    s["parallel"] = _mean([r["has_block"] for r in rows])   # share of rollouts with a valid block
    s["format_ok"] = _mean([r["format_ok"] for r in rows])
    s["length"] = _mean([r["length"] for r in rows])        # response tokens
    sums = {}  # the behaviour metrics (blocks, where they open, latency ratio, ...) from row sums
    for r in rows:
        for k, v in r.get("behaviour", {}).items():
            sums[k] = sums.get(k, 0) + v
    return {**s, **(metrics.from_sums(sums) if sums else {})}


def paired_difference(rows_a, rows_b, key="correct"):
    """Difference(mean, stderr) of b - a over the problems both share, a problem's value being the
    mean `key` (correct, has_block) of its rollouts: paired, as both models saw the same problems."""
    a = {p: _mean(v) for p, v in _by_problem(rows_a, key).items()}
    b = {p: _mean(v) for p, v in _by_problem(rows_b, key).items()}
    d = [b[p] - a[p] for p in sorted(set(a) & set(b))]
    if len(d) < 2:
        return Difference(_mean(d), float("nan"))
    m = _mean(d)
    return Difference(m, (sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5)


def format_table(summaries):
    """{dataset: summary} -> a printable table, rates in %. Datasets may differ in n (MATH300
    Mean@1, AIME Mean@16): every mean@n and pass@k of some dataset is a column, "-" where none."""
    if not summaries:
        return "(no datasets)"
    keys = [k for s in summaries.values() for k in s if "@" in k]
    means = list(dict.fromkeys(k for k in keys if k.startswith("mean@")))
    passes = sorted({k for k in keys if k.startswith("pass@")}, key=lambda k: int(k[5:]))
    rates = means + passes + ["parallel", "format_ok"]
    names = {"parallel": "parallel%", "format_ok": "format%"}
    # length in tokens, blocks per rollout, latency = length / critical path
    lines = [["dataset", "problems"] + [names.get(k, k) for k in rates] + ["length", "blocks", "latency"]]
    show = lambda s, k: "-" if s.get(k) is None else f"{s[k]:.2f}"
    for name, s in summaries.items():
        percents = [f"{100 * s[k]:.1f}" if k in s else "-" for k in rates]
        lines.append([name, str(s["problems"])] + percents
                     + [f"{s['length']:.0f}", show(s, "blocks_per_rollout"), show(s, "latency_ratio")])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    align = lambda i, c, w: c.ljust(w) if i == 0 else c.rjust(w)  # names left, numbers right
    return "\n".join("  ".join(align(i, c, w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)

# -----------------------------------------------------------------------------
# grading, resuming, sharding


def grade_rollout(problem, index, sample_index, rollout, grader=None):
    """One JSONL row: the rollout's text and its grade under R_acc (by `grader`, None: built-in)."""
    _, m = reward_rollout(rollout, problem["answer"], "accuracy", grader=grader)
    grade = {k: m[k] for k in ("answer", "correct", "has_block", "format_ok", "num_blocks")}
    return {"problem": index, "sample": sample_index, "question": problem["question"],
            "gold": problem["answer"], **grade, "length": len(rollout.ids),
            "stop_reason": rollout.stop_reason, "behaviour": metrics.sums([rollout]), "text": rollout.text}


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


def merge(rows_lists):
    """The rows of several ranks (or files) as one list, in (problem, sample) order."""
    return sorted((r for rows in rows_lists for r in rows), key=lambda r: (r["problem"], r["sample"]))


def shard(num_problems, batch_size, rank=0, world=1):
    """The batches of problem indices `rank` samples: every world-th batch, starting at its own."""
    starts = range(0, num_problems, batch_size)
    batches = [list(range(s, min(s + batch_size, num_problems))) for s in starts]
    return batches[rank::world]


@torch.no_grad()
def evaluate(model, tokenizer, problems, n=16, *, template=PARALLEL_PROMPT, parallel=True,
             batch_size=4, done=(), on_rows=None, progress=True, desc="eval", seed=None, rank=0,
             world=1, grader=None, **sampling):
    """Sample and grade n rollouts per problem of this rank's share; returns (rows, summary) of it.
    `done`: an earlier run's rows (its complete problems are kept); `on_rows(new_rows)`: called
    after each batch (eval.py appends them to a JSONL); `sampling`: sampler.sample's options."""
    batches = shard(len(problems), batch_size, rank, world)
    mine = {i for batch in batches for i in batch}
    rows = [r for r in complete_rows(list(done), problems, n) if r["problem"] in mine]
    finished = {r["problem"] for r in rows}
    was_training = model.training
    model.eval()
    with tqdm(total=len(mine), initial=len(finished), desc=desc, unit="problem",
              disable=not progress) as bar:
        for batch in batches:
            batch = [i for i in batch if i not in finished]
            if not batch:
                continue
            prompts = [chat_prompt_ids(tokenizer, template, problems[i]["question"]) for i in batch]
            seeds = None if seed is None else [mix(seed, i) for i in batch]  # a seed per problem
            rollouts = sampler.sample(model, tokenizer, prompts, group_size=n, parallel=parallel,
                                      seed=seeds, **sampling)
            new = [grade_rollout(problems[i], i, j, rollouts[b * n + j], grader)
                   for b, i in enumerate(batch) for j in range(n)]
            rows += new
            if on_rows is not None:
                on_rows(new)
            bar.update(len(batch))
    model.train(was_training)
    rows = merge([rows])
    return rows, summarize(rows, n)


def evaluate_everywhere(model, tokenizer, problems, n, gather, rank=0, world=1, **kw):
    """Every rank evaluates its share and `gather` (e.g. accelerate.utils.gather_object) collects
    the rows; every rank returns (rows, summary) of the whole set (train_rl.py's --eval-every)."""
    rows, _ = evaluate(model, tokenizer, problems, n, rank=rank, world=world, progress=False, **kw)
    rows = merge([gather(rows)])
    return rows, summarize(rows, n)
