"""
Behaviour metrics of rollouts, read from their token-level block structure
(`Rollout.ids` and `Rollout.blocks`): how often and how early a policy opens
<Parallel> blocks, how much of its text goes into paths, how much shorter its
critical path would be if the paths of each block decoded concurrently, and how
different sibling paths are. These are the numbers Parallel-R1 and ThreadWeaver
use to describe a run beyond accuracy.

Counting conventions (the same for every metric):
- the response length n is len(rollout.ids): every token the sampler decoded,
  tags and a final EOS included (EOS costs a decoding step like any other, and
  this is the `length` that train_rl.py and eval.py log);
- a path's length counts its <Path> and </Path>; a summary's counts <Summary>
  and </Summary>; </Parallel> and <Parallel> are main-line tokens;
- a rollout whose tags are malformed has no blocks (make_rollout leaves
  `blocks` empty), so it counts as a rollout without a block.

`summarize` is computed from per-batch sums (`sums` -> `from_sums`) so that a
multi-process run can add the sums of every rank and divide once.
"""

from itertools import combinations


def bigrams(ids):
    return set(zip(ids, ids[1:]))


def path_overlap(a, b):
    """Jaccard overlap of two paths: |A & B| / |A | B| where A, B are the sets of token-id bigrams
    of each path *with* its <Path> and </Path>. The tags act as start/end markers, so every path
    (2 tokens at least) has a bigram, shared first/last tokens count, and two empty paths are equal."""
    A, B = bigrams(a), bigrams(b)
    return len(A & B) / len(A | B)


def block_diversity(paths):
    """1 - mean overlap over the unordered pairs of sibling paths (0: all identical, 1: no shared bigram)."""
    pairs = list(combinations(paths, 2))
    return 1 - sum(path_overlap(a, b) for a, b in pairs) / len(pairs)


def rollout_metrics(rollout):
    """Metrics of one rollout (see the module docstring for what counts as a token).

    critical_path: the tokens on the longest route when the paths of each block decode
    concurrently: every token outside paths (main text, <Parallel>, </Parallel>, summaries with
    their tags, EOS) plus the longest path of each block, i.e.
        n - sum over blocks (sum of its path lengths - its longest path length).
    latency_ratio = n / critical_path (>= 1; exactly 1 without a block).
    path_diversity: a list, one block_diversity per block.
    """
    ids, blocks = rollout.ids, rollout.blocks
    n = len(ids)
    lens = [[e - s for s, e in b.paths] for b in blocks]  # path lengths per block, tags included
    path_tokens = sum(sum(ls) for ls in lens)
    critical_path = n - sum(sum(ls) - max(ls) for ls in lens)
    return {"num_blocks": len(blocks),
            "first_block_pos": blocks[0].parallel / n if blocks else None,
            "num_paths": sum(len(ls) for ls in lens),
            "path_tokens": path_tokens,
            "summary_tokens": sum(b.summary[1] - b.summary[0] for b in blocks),
            "path_share": path_tokens / n if n else 0.0,
            "critical_path": critical_path,
            "latency_ratio": n / critical_path if critical_path else 1.0,
            "path_diversity": [block_diversity([ids[s:e] for s, e in b.paths]) for b in blocks]}


def sums(rollouts):
    """The additive pieces of `summarize`, as floats (same keys in the same order for any batch,
    so ranks can reduce them as one tensor)."""
    out = dict.fromkeys(["rollouts", "response_tokens", "blocks", "with_block", "first_block_pos", "paths",
                         "path_tokens", "summary_tokens", "critical_path", "path_diversity"], 0.0)
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
    """Batch means from (possibly rank-summed) `sums`:
    blocks_per_rollout  blocks / rollouts
    first_block_pos     mean over the rollouts WITH a block (None if none has one)
    path_len            mean path length over all paths, tags included (None without paths)
    summary_len         mean summary length over all blocks, tags included
    path_share          token-weighted: path tokens / response tokens of the whole batch
    critical_path       mean critical path per rollout
    latency_ratio       ratio of sums: response tokens / critical-path tokens of the batch, i.e. the
                        speed-up of the batch's decoding if paths ran concurrently; a mean of ratios
                        would let short rollouts, which cost little, weigh as much as long ones
    path_diversity      mean over blocks
    """
    return {"blocks_per_rollout": _div(s["blocks"], s["rollouts"]),
            "first_block_pos": _div(s["first_block_pos"], s["with_block"]),
            "path_len": _div(s["path_tokens"], s["paths"]),
            "summary_len": _div(s["summary_tokens"], s["blocks"]),
            "path_share": _div(s["path_tokens"], s["response_tokens"]),
            "critical_path": _div(s["critical_path"], s["rollouts"]),
            "latency_ratio": _div(s["response_tokens"], s["critical_path"]),
            "path_diversity": _div(s["path_diversity"], s["blocks"])}


def summarize(rollouts):
    """Means over a batch of rollouts (see from_sums)."""
    return from_sums(sums(rollouts))
