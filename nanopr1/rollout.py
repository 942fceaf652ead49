"""
A rollout: what the sampler returns and everything downstream reads (rewards,
scoring, behaviour metrics, eval), and the state of one in progress. Its structure is read from its tag tokens
alone (`make_rollout`): a tag spelled with ordinary sub-word pieces is text.

`allowed` records, per response token, the tags the sampler let it be (a
bitmask over format.TAGS); `apply_tag_mask` turns logits into the distribution
that token was sampled from, for the sampler and the trainer alike. A rollout's
random draws come from a stream of its own (`mix`, `gumbel`).
"""

from dataclasses import dataclass, field

import torch

from nanopr1.attention import main_line, structure
from nanopr1.format import TAGS
from nanopr1.model import tag_ids

BIT = {t: 1 << i for i, t in enumerate(TAGS)}  # bit i of `allowed` = TAGS[i]
ALL_TAGS = (1 << len(TAGS)) - 1


@dataclass
class Rollout:
    prompt_ids: list  # the prompt token ids
    ids: list         # response token ids in canonical layout (prompt excluded)
    forced: list      # bool per response token: True = inserted by the runtime (no policy loss)
    logprobs: list    # float per response token: the sampler's log-prob (0.0 where forced)
    positions: list   # position id of each response token (the prompt is 0..P-1)
    allowed: list     # int per response token: bitmask over format.TAGS of the tags allowed when sampled
    blocks: list      # BlockSpan list: the blocks the tag tokens form (none if they are malformed)
    text: str         # decoded response, tags kept
    stop_reason: str  # "eos" | "budget"
    main_text: str = ""       # decoded main-line tokens (outside blocks and summaries) without special tokens;
                              # a tag spelled with ordinary sub-word pieces stays plain text here
    format_error: str = None  # None if the tag tokens are well formed (always, when the sampler forks)


def apply_tag_mask(logits, allowed, tags):
    """Logits with the tags not in `allowed` set to -inf: what the sampler sampled from.

    logits (..., V); allowed (...) int bitmask as in Rollout.allowed; tags = model.tag_ids(tokenizer).
    The logits that predict response token t (at position P+t-1) take allowed[t].
    """
    bits = (allowed[..., None] >> torch.arange(len(TAGS), device=logits.device)) & 1  # (..., 6)
    idx = torch.tensor([tags[t] for t in TAGS], device=logits.device)
    logits = logits.clone()
    logits[..., idx] = logits[..., idx].masked_fill(bits == 0, float("-inf"))
    return logits


def make_rollout(tokenizer, prompt, ids, stop_reason="eos", forced=None, logprobs=None, positions=None, allowed=None):
    """A Rollout from its response token ids; its structure (blocks, format_error, main_text) is read
    from the tag tokens alone. The sampler builds every rollout here; tests build rollouts by hand
    (the per-token lists default to: sampled, log-prob 0, sequential positions, every tag allowed)."""
    n, tags = len(ids), tag_ids(tokenizer)
    blocks, error = structure(ids, tags)
    end = n - (stop_reason == "eos")  # the EOS token is not text
    main = [t for t, m in zip(ids[:end], main_line(ids[:end], tags)) if m]
    text = tokenizer.decode(ids[:end], skip_special_tokens=False)  # tags kept
    main_text = tokenizer.decode(main, skip_special_tokens=True)  # `42<|im_end|>` is read as 42
    return Rollout(list(prompt), list(ids), forced or [False] * n, logprobs or [0.0] * n,
                   positions or list(range(len(prompt), len(prompt) + n)), allowed or [ALL_TAGS] * n,
                   blocks, text, stop_reason, main_text, error)


def texts(rollout, tokenizer):
    """The texts of a rollout, tags stripped: {"main": its main-text segments, "blocks": [{"paths": [...],
    "summary": ...}]}, a block between each two main segments (what sample.py prints as a tree)."""
    dec = lambda a, b: tokenizer.decode(rollout.ids[a:b], skip_special_tokens=False)
    main, blocks, prev = [], [], 0
    for b in rollout.blocks:
        main.append(dec(prev, b.parallel))
        blocks.append({"paths": [dec(s + 1, e - 1) for s, e in b.paths], "summary": dec(b.summary[0] + 1, b.summary[1] - 1)})
        prev = b.summary[1]
    main.append(dec(prev, len(rollout.ids) - (rollout.stop_reason == "eos")))  # the EOS token is not text
    return {"main": main, "blocks": blocks}


def rollout_row(rollout, tokenizer, grade, gold=None, step=None):
    """A rollout as a JSON row a person reads (train_rl.py's OUT/rollouts.jsonl, `sample.py --show`, tree);
    grade: what rewards.reward_rollout said of it."""
    return {"step": step, "prompt": tokenizer.decode(rollout.prompt_ids, skip_special_tokens=False),
            "response": rollout.text, **texts(rollout, tokenizer), "answer": grade["answer"], "gold": gold,
            "reward": grade["reward"], "correct": grade["correct"], "tokens": len(rollout.ids),
            "stop_reason": rollout.stop_reason}



def tree(row):
    """A rollout's texts (a rollout_row, or texts() with tokens / stop_reason / answer) as a printable tree."""
    main, blocks = row["main"], row["blocks"]
    indent = lambda text, prefix: "\n".join(prefix + line for line in text.strip("\n").split("\n"))
    lines = [f"{row['tokens']} tokens, {len(blocks)} block(s), stop: {row['stop_reason']}"]
    for k, segment in enumerate(main):
        lines += [indent(segment, "  ")] if segment.strip() else []
        if k < len(blocks):
            lines.append(f"  ┌─ parallel block {k + 1}")
            for j, path in enumerate(blocks[k]["paths"]):
                lines += [f"  ├─ path {j + 1}", indent(path, "  │    ")]
            lines += ["  └─ summary", indent(blocks[k]["summary"], "       ")]
    gold = f"   gold: {row['gold']}   reward: {row['reward']}" if row.get("gold") is not None else ""
    return "\n".join(lines + [f"answer: {row['answer']}{gold}"])

# -----------------------------------------------------------------------------
# a rollout in progress: the sampler's state (sampler.py changes it)


MAIN, PATHS, SUMMARY_PHASE = "main", "paths", "summary"  # what a rollout is writing


class Segment:
    """Tokens written by one row (the main line of a rollout, or one path), as five parallel lists."""

    def __init__(self):
        self.ids, self.forced, self.logprobs, self.positions, self.allowed = [], [], [], [], []

    def columns(self):
        return self.ids, self.forced, self.logprobs, self.positions, self.allowed

    def add(self, tok, forced, logprob, pos, allowed):
        for column, x in zip(self.columns(), (tok, forced, 0.0 if forced else logprob, pos, allowed)):
            column.append(x)


@dataclass
class BlockState:  # the block a rollout is writing
    parallel: int     # response index of <Parallel>
    p: int            # its position id
    budget: int       # tokens per path, its two tags included
    n_prefix: int     # valid cache entries before the paths (shared by all path rows)
    paths: list       # one Segment per path
    done: int = 0     # paths finished (their rows park until the merge)
    spans: list = None  # (start, end) of each path in the response, set at the merge
    summary: int = 0  # response index of <Summary>


@dataclass(eq=False)
class RolloutState:  # one rollout being written
    prompt: list                                # the prompt token ids
    key: int                                    # the seed of its random stream (prompt seed, rollout of its group)
    force: object                               # None, or when to force the first <Parallel>: n tokens or "line"
    out: Segment = field(default_factory=Segment)  # the response so far, canonical layout
    phase: str = MAIN                           # MAIN, PATHS or SUMMARY_PHASE
    blocks: list = field(default_factory=list)  # finished blocks (BlockSpan)
    block: BlockState = None                    # the block being written
    stop: str = None                            # "eos" | "budget" once finished


@dataclass(eq=False)
class RowState:  # one cache row: the main line of a rollout (path None) or one of its paths
    ro: RolloutState                            # the rollout it writes
    path: object                                # None or the path index
    seg: Segment                                # where its tokens go: ro.out, or its path's segment
    pos: int                                    # position id of the next token fed
    queue: list = field(default_factory=list)   # forced tokens to insert next
    fork: bool = False                          # <Parallel> was just fed: fork before the next token
    closing: bool = False                       # </Path> is being fed: the path ends after this forward
    parked: bool = False                        # a finished path: not fed, kept for the merge

    def noise_key(self):
        """The key of this row's next draw, new at every draw of the rollout: the main line's response
        index, or a path's (block, path, index in the path)."""
        ro = self.ro
        return mix(ro.key, len(ro.out.ids)) if self.path is None else mix(ro.key, len(ro.blocks), self.path,
                                                                            len(self.seg.ids), -1)

# -----------------------------------------------------------------------------
# random streams that do not depend on the batch: hashes of integers

M64 = (1 << 64) - 1


def mix(*xs):
    """A 64-bit hash of a few integers (splitmix64 steps), as a signed int64."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x & M64)) * 0xBF58476D1CE4E5B9 & M64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & M64
        h ^= h >> 31
    return h - (1 << 64) if h >> 63 else h


def gumbel(keys, V):
    """(R, V) Gumbel noise that is a hash of (keys[r], v) alone: argmax(log p + noise) samples from p."""
    x = keys[:, None] * V + torch.arange(V, device=keys.device)  # int64, wrapping
    for k, m in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB), (31, 0)):  # splitmix64's finaliser
        x = x ^ ((x >> k) & ((1 << (64 - k)) - 1))  # a logical shift (>> on int64 keeps the sign)
        x = x * (m - (1 << 64) if m >> 63 else m) if m else x
    u = ((x >> 40) & 0xFFFFFF).float().add_(0.5).div_(1 << 24)  # 24 random bits -> (0, 1)
    return -torch.log(-torch.log(u))
