"""
Behaviour metrics of rollouts, read from their token-level block structure (`Rollout.ids`,
`Rollout.blocks`): how often and how early a policy opens blocks, how much of its text goes into
paths, how much shorter its critical path would be if a block's paths decoded concurrently, and how
different sibling paths are. What counts as a token: docs/design.md, "Behaviour metrics".
`summarize` goes through per-batch sums (`sums` -> `from_sums`): ranks add sums, then divide once.
"""

from itertools import combinations


def bigrams(ids):
    return set(zip(ids, ids[1:]))


def path_overlap(a, b):
    """Jaccard overlap of the token-id bigrams of two paths, each *with* its <Path> and </Path>: the
    tags mark start and end, so a path always has a bigram and two empty paths are equal."""
    A, B = bigrams(a), bigrams(b)
    return len(A & B) / len(A | B)


def block_diversity(paths):
    """1 - mean overlap over the pairs of sibling paths (0: all identical, 1: no shared bigram)."""
    pairs = list(combinations(paths, 2))
    return 1 - sum(path_overlap(a, b) for a, b in pairs) / len(pairs)


def rollout_metrics(rollout):
    """The metrics of one rollout, a dict; path_diversity is a list, one value per block."""
    ids, blocks = rollout.ids, rollout.blocks
    n = len(ids)
    lens = [[e - s for s, e in b.paths] for b in blocks]  # path lengths per block, tags included
    path_tokens = sum(sum(ls) for ls in lens)
    # the tokens on the longest route if a block's paths decode concurrently: all but its shorter paths
    critical_path = n - sum(sum(ls) - max(ls) for ls in lens)
    return {"num_blocks": len(blocks),
            "first_block_pos": blocks[0].parallel / n if blocks else None,
            "num_paths": sum(len(ls) for ls in lens),
            "path_tokens": path_tokens,
            "summary_tokens": sum(b.summary[1] - b.summary[0] for b in blocks),
            "path_share": path_tokens / n if n else 0.0,
            "critical_path": critical_path,
            "latency_ratio": n / critical_path if critical_path else 1.0,  # >= 1; 1 without a block
            "path_diversity": [block_diversity([ids[s:e] for s, e in b.paths]) for b in blocks]}


def sums(rollouts):
    """The additive pieces of `summarize`, as floats: the same keys in the same order for any
    batch, so ranks can reduce them as one tensor."""
    out = dict.fromkeys(["rollouts", "response_tokens", "blocks", "with_block", "first_block_pos",
                         "paths", "path_tokens", "summary_tokens", "critical_path", "path_diversity"], 0.0)
    for r in rollouts:
        m = rollout_metrics(r)
        out["rollouts"] += 1
        out["response_tokens"] += len(r.ids)
        out["blocks"] += m["num_blocks"]
        out["with_block"] += m["num_blocks"] > 0
        out["first_block_pos"] += m["first_block_pos"] or 0.0
        out["paths"] += m["num_paths"]
        for k in ("path_tokens", "summary_tokens", "critical_path"):
            out[k] += m[k]
        out["path_diversity"] += sum(m["path_diversity"])
    return out


def _div(a, b):
    return a / b if b else None  # None: nothing to average (e.g. no block in the batch)


def from_sums(s):
    """Batch means from (possibly rank-summed) `sums`; lengths count the tags."""
    return {"blocks_per_rollout": _div(s["blocks"], s["rollouts"]),
            "first_block_pos": _div(s["first_block_pos"], s["with_block"]),  # rollouts with a block
            "path_len": _div(s["path_tokens"], s["paths"]),
            "summary_len": _div(s["summary_tokens"], s["blocks"]),
            "path_share": _div(s["path_tokens"], s["response_tokens"]),  # token-weighted
            "critical_path": _div(s["critical_path"], s["rollouts"]),
            # a ratio of sums, the batch's decoding speed-up: a mean of ratios would let short
            # rollouts, which cost little, weigh as much as long ones
            "latency_ratio": _div(s["response_tokens"], s["critical_path"]),
            "path_diversity": _div(s["path_diversity"], s["blocks"])}  # mean over blocks


def summarize(rollouts):
    """Means over a batch of rollouts (from_sums)."""
    return from_sums(sums(rollouts))
