"""Behaviour metrics of rollouts, read from their block structure (`Rollout.ids`, `Rollout.blocks`):
how often and how early a policy opens blocks, how much of its text goes into paths, how much
shorter its critical path is if a block's paths decode concurrently, and how different sibling paths
are. Conventions, why a batch goes `sums` -> `from_sums`: docs/design.md, "Behaviour metrics"."""

import time
from collections import Counter
from itertools import combinations

import torch


def path_overlap(a, b):
    """Jaccard overlap of the token-id bigrams of two paths, each with its <Path> and </Path>."""
    A, B = set(zip(a, a[1:])), set(zip(b, b[1:]))
    return len(A & B) / len(A | B)


def block_diversity(paths):
    """1 - mean overlap over the pairs of sibling paths (0: all identical, 1: no shared bigram)."""
    pairs = list(combinations(paths, 2))
    return 1 - sum(path_overlap(a, b) for a, b in pairs) / len(pairs)


def rollout_metrics(rollout):
    """The metrics of one rollout, a dict; path_diversity is a list, one value per block."""
    ids, blocks, n = rollout.ids, rollout.blocks, len(rollout.ids)
    lens = [[e - s for s, e in b.paths] for b in blocks]  # path lengths per block, tags included
    path_tokens = sum(sum(ls) for ls in lens)
    # the tokens on the longest route if a block's paths decode concurrently
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
    """The additive pieces of `means`: floats, the same keys in the same order in any batch."""
    out = dict.fromkeys(["rollouts", "response_tokens", "blocks", "with_block", "first_block_pos",
                         "paths", "path_tokens", "summary_tokens", "critical_path",
                         "path_diversity"], 0.0)
    for r in rollouts:
        m = rollout_metrics(r)
        this = {"rollouts": 1, "response_tokens": len(r.ids), "blocks": m["num_blocks"],
                "with_block": m["num_blocks"] > 0, "first_block_pos": m["first_block_pos"] or 0.0,
                "paths": m["num_paths"], "path_diversity": sum(m["path_diversity"]),
                **{k: m[k] for k in ("path_tokens", "summary_tokens", "critical_path")}}
        for k, v in this.items():
            out[k] += v
    return out


def from_sums(s):
    """Batch means from (possibly rank-summed) `sums`; None where there is nothing to average."""
    div = lambda a, b: a / b if b else None  # e.g. no block in the batch
    return {"blocks_per_rollout": div(s["blocks"], s["rollouts"]),
            "first_block_pos": div(s["first_block_pos"], s["with_block"]),  # rollouts with a block
            "path_len": div(s["path_tokens"], s["paths"]),
            "summary_len": div(s["summary_tokens"], s["blocks"]),
            "path_share": div(s["path_tokens"], s["response_tokens"]),  # token-weighted
            "critical_path": div(s["critical_path"], s["rollouts"]),
            "latency_ratio": div(s["response_tokens"], s["critical_path"]),  # a ratio of sums
            "path_diversity": div(s["path_diversity"], s["blocks"])}  # mean over blocks


def means(rollouts):
    """Means over a batch of rollouts (from_sums)."""
    return from_sums(sums(rollouts))


def step_row(acc, step, rollouts, grades, zero_groups, groups, stats, t0, t_rollout):
    """train_rl.py's metrics row of an RL step: sums reduced over the ranks, then divided."""
    m = {k: sum(g[k] for g in grades) for k in ("reward", "correct", "has_block", "format_ok")}
    m.update(length=sum(len(r.ids) for r in rollouts), zero_groups=zero_groups, groups=groups, **stats,
             **{f"b_{k}": v for k, v in sums(rollouts).items()})
    reduced = acc.reduce(torch.tensor(list(m.values()), dtype=torch.float64, device=acc.device), "sum")
    m = Counter({k: v.item() for k, v in zip(m, reduced)})
    n, tokens = m["b_rollouts"], max(m["tokens"], 1)
    row = {"step": step, "reward": m["reward"] / n, "accuracy": m["correct"] / n,
           "parallel_rate": m["has_block"] / n, "format_ok": m["format_ok"] / n, "length": m["length"] / n,
           "zero_adv_groups": m["zero_groups"] / m["groups"], "clip_frac": m["clipped_tokens"] / tokens,
           "skipped_updates": m["skipped_updates"] / acc.num_processes,  # non-finite gradient norms
           "ratio": m["ratio_sum"] / tokens, "kl": m["kl_sum"] / tokens, "loss": m["loss"],
           # |trainer - sampler| log-prob where the trainer sees what the sampler saw; Seen's later paths
           "logp_gap": m["gap_sum"] / max(m["gap_tokens"], 1),
           "seen_later_paths_gap": m["later_paths_sum"] / max(m["later_paths_tokens"], 1)}
    if "tis_sum" in m:  # --tis-cap: the mean weight, and the share of tokens at the cap
        row.update(tis_weight=m["tis_sum"] / tokens, tis_capped=m["tis_capped"] / tokens)
    row.update(from_sums({k[2:]: v for k, v in m.items() if k.startswith("b_")}))
    row.update(reward_fn=grades[0]["reward_fn"], rollout_s=t_rollout, update_s=time.time() - t0 - t_rollout,
               tokens_per_s=m["length"] / max(t_rollout, 1e-9) / acc.num_processes)  # per rank
    return row
