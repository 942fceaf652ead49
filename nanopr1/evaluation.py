"""Mean@n, Pass@k and the parallel rate of n graded rollouts per problem (docs/design.md, "Evaluation").

Mean@n is the share of a problem's n rollouts graded correct, averaged over the problems; Pass@k the
chance that k of them, drawn without replacement, hold a correct one (the unbiased estimate); the
parallel rate the share of rollouts with a valid parallel block. A rollout is graded as in RL."""

from collections import Counter, namedtuple
from math import comb

from tqdm import tqdm

from nanopr1 import metrics, sampler
from nanopr1.data import prompt_ids
from nanopr1.format import PARALLEL_PROMPT
from nanopr1.rewards import grade, reward_rollout
from nanopr1.sampler import mix

Difference = namedtuple("Difference", "mean stderr")  # paired_difference()


def pass_at_k(n, c, k):
    """Unbiased Pass@k from n samples with c correct (k <= n): 1 - C(n-c, k) / C(n, k)."""
    return 1.0 - comb(n - c, k) / comb(n, k)


def ks_for(n):
    """The k reported for n samples: powers of two below n, and n itself."""
    return sorted({2 ** i for i in range(n.bit_length()) if 2 ** i < n} | {n})


def _mean(xs):
    return sum(xs) / len(xs) if xs else 0.0


def _by_problem(rows, key):
    """{problem: [r[key] of its rows]}."""
    found = {}
    for r in rows:
        found.setdefault(r["problem"], []).append(r[key])
    return found


def _accuracy(rows, n, key):
    """Mean@n and Pass@k of the rows' grades in `key`."""
    counts = [(len(v), sum(v)) for v in _by_problem(rows, key).values()]  # (samples, correct)
    return {f"mean@{n}": _mean([c / m for m, c in counts]),
            **{f"pass@{k}": _mean([pass_at_k(m, c, k) for m, c in counts]) for k in ks_for(n)}}


def summarize(rows, n):
    """One dataset's numbers from its graded rollout rows (n per problem): Mean@n and Pass@k, the
    parallel rate, the format-valid rate, the mean length and the behaviour metrics. Rows graded a
    second time (`lenient_correct`) add that grader's Mean@n and Pass@k under "lenient"."""
    # the behaviour metrics (blocks, latency ratio, ...) reduce from the sums each row keeps
    sums = Counter()
    for r in rows:
        sums.update(r.get("behaviour", {}))
    first = rows[0] if rows else {}
    graders = {"grader": first["grader"]} if "grader" in first else {}
    if "lenient_correct" in first:
        graders["lenient"] = {"grader": first["lenient_grader"], **_accuracy(rows, n, "lenient_correct")}
    return {"problems": len({r["problem"] for r in rows}), "rollouts": len(rows), "n": n,
            **_accuracy(rows, n, "correct"),
            "parallel": _mean([r["has_block"] for r in rows]),  # the parallel rate
            "format_ok": _mean([r["format_ok"] for r in rows]),
            "length": _mean([r["length"] for r in rows]),  # response tokens
            **(metrics.from_sums(sums) if sums else {}), **graders}


def paired_difference(rows_a, rows_b, key="correct"):
    """Difference(mean, stderr) of b - a, paired over the problems both have: their mean `key`."""
    # each problem's mean under a and under b; the standard error of the mean of their differences
    a, b = ({p: _mean(v) for p, v in _by_problem(rows, key).items()} for rows in (rows_a, rows_b))
    d = [b[p] - a[p] for p in sorted(set(a) & set(b))]
    m = _mean(d)
    if len(d) < 2:
        return Difference(m, float("nan"))
    return Difference(m, (sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5)


def format_table(summaries):
    """{dataset: summary} -> a printable table, "-" where a dataset lacks a column (pass@16). The
    Mean@n columns name their grader; a lenient grader adds its Mean@n and Pass@n beside them."""
    keys = list(dict.fromkeys(k for s in summaries.values() for k in s))  # first-seen order
    means = [k for k in keys if k.startswith("mean@")]
    passes = sorted((k for k in keys if k.startswith("pass@")), key=lambda k: int(k[5:]))
    # the rate columns, each (header, its value in a summary): Mean@n by the grader (module:function
    # by its name), the Pass@k of the same grader, the lenient grader's from its own dict, the rates
    titled = lambda k, g: f"{k} ({g.rpartition(':')[2]})" if g else k
    grader = next((s["grader"] for s in summaries.values() if "grader" in s), None)
    rates = [(titled(k, grader), lambda s, k=k: s.get(k)) for k in means]
    rates += [(k, lambda s, k=k: s.get(k)) for k in passes]
    lenient = next((s["lenient"]["grader"] for s in summaries.values() if "lenient" in s), None)
    if lenient:
        extra = means + [f"pass@{n}" for n in sorted({s["n"] for s in summaries.values()}) if n > 1]
        rates += [(titled(k, lenient), lambda s, k=k: s.get("lenient", {}).get(k)) for k in extra]
    rates += [("parallel%", lambda s: s["parallel"]), ("format%", lambda s: s["format_ok"])]
    # rates in %, length in tokens, blocks per rollout, latency = length / critical path
    percent = lambda v: "-" if v is None else f"{100 * v:.1f}"
    show = lambda s, k: "-" if s.get(k) is None else f"{s[k]:.2f}"
    lines = [["dataset", "problems", *(h for h, _ in rates), "length", "blocks", "latency"]]
    for name, s in summaries.items():
        lines.append([name, str(s["problems"]), *(percent(value(s)) for _, value in rates),
                      f"{s['length']:.0f}", show(s, "blocks_per_rollout"), show(s, "latency_ratio")])
    # each column as wide as its widest cell: the names left-aligned, the numbers right
    widths = [max(map(len, column)) for column in zip(*lines)]
    pad = lambda i, c: c.rjust(widths[i]) if i else c.ljust(widths[i])
    return "\n".join("  ".join(pad(i, c) for i, c in enumerate(line)) for line in lines)


def named(grader):
    """(name, function) of a grader given as a function, a (name, function) pair or None (is_equiv)."""
    if grader is None or isinstance(grader, tuple):
        return grader or ("is_equiv", None)
    return getattr(grader, "__name__", type(grader).__name__), grader


def grade_rollout(problem, i, j, rollout, grader=None, lenient=None):
    """Problem i's sample j as a JSONL row: text, R_acc grade (by `grader`), behaviour sums; with a
    `lenient` grader its grade too. A grader: a function or a (name, function) pair."""
    # graded as RL grades it (R_acc): the answer, correct, the block and format checks
    name, fn = named(grader)
    _, m = reward_rollout(rollout, problem["answer"], "accuracy", grader=fn)
    row = {"problem": i, "sample": j, "question": problem["question"], "gold": problem["answer"],
           "grader": name, **{k: m[k] for k in ("answer", "correct", "has_block", "format_ok", "num_blocks")}}
    if lenient is not None:
        name, fn = named(lenient)
        correct, answer = grade(rollout, problem["answer"], fn)
        row.update(lenient_grader=name, lenient_correct=correct, lenient_answer=answer)
    return {**row, "length": len(rollout.ids), "stop_reason": rollout.stop_reason,
            "behaviour": metrics.sums([rollout]), "text": rollout.text}


def complete_rows(rows, n):
    """The rows of the problems whose n samples are all present, in (problem, sample) order: a
    half-done problem is sampled again, a row read twice (a merge cut short) counts once."""
    by_problem = {}
    for r in rows:
        by_problem.setdefault(r["problem"], {})[r["sample"]] = r
    return [r for i in sorted(by_problem) if len(by_problem[i]) == n
            for _, r in sorted(by_problem[i].items())]


def merge(shares):
    """The rows of several ranks (or files) as one list, in (problem, sample) order."""
    return sorted((r for rows in shares for r in rows), key=lambda r: (r["problem"], r["sample"]))


def shard(num_problems, batch_size, rank=0, world=1):
    """The batches of problem indices `rank` samples: every world-th batch, starting at its own."""
    starts = range(0, num_problems, batch_size)
    return [list(range(s, min(s + batch_size, num_problems))) for s in starts][rank::world]


def evaluate(model, tokenizer, problems, n=16, *, template=PARALLEL_PROMPT, parallel=True,
             batch_size=4, done=(), on_rows=None, progress=True, desc="eval", seed=None, rank=0,
             world=1, grader=None, lenient=None, **sampling):
    """(rows, summary) of this rank's share, n graded rollouts a problem; `done`: earlier rows.
    A problem's prompt: its own chat if it has one, else `template` around its question."""
    # this rank's batches, less the problems an earlier run finished
    batches = shard(len(problems), batch_size, rank, world)
    mine = {i for batch in batches for i in batch}
    rows = [r for r in complete_rows(done, n) if r["problem"] in mine]
    finished = {r["problem"] for r in rows}
    was_training = model.training
    model.eval()
    with tqdm(total=len(mine), initial=len(finished), desc=desc, unit="problem",
              disable=not progress) as bar:
        todo = ([i for i in batch if i not in finished] for batch in batches)
        for batch in filter(None, todo):  # the batches with problems left to sample
            # n rollouts a problem, each problem from a seed of its own: the same whatever the batch
            prompts = [prompt_ids(tokenizer, template, problems[i]) for i in batch]
            seeds = None if seed is None else [mix(seed, i) for i in batch]
            rollouts = sampler.sample(model, tokenizer, prompts, group_size=n, parallel=parallel,
                                      seed=seeds, **sampling)
            # graded as in RL; on_rows keeps each batch's rows as they come (a killed run resumes)
            new = [grade_rollout(problems[i], i, j, rollouts[b * n + j], grader, lenient)
                   for b, i in enumerate(batch) for j in range(n)]
            rows += new
            if on_rows is not None:
                on_rows(new)
            bar.update(len(batch))
    model.train(was_training)
    rows = merge([rows])
    return rows, summarize(rows, n)


def evaluate_everywhere(model, tokenizer, problems, n, gather, rank=0, world=1, **kw):
    """train_rl.py's --eval-every: (rows, summary) of the set on all ranks (`gather` joins them)."""
    rows, _ = evaluate(model, tokenizer, problems, n, rank=rank, world=world, progress=False, **kw)
    rows = merge([gather(rows)])
    return rows, summarize(rows, n)
