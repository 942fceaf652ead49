"""
A rollout from request to record: what the sampler takes (Options, check_request), the state of a rollout
while it is written (RolloutState), the tag mask it samples under, what it returns (Rollout, make_rollout)
and a Rollout as a row to read (rollout_row, tree: OUT/rollouts.jsonl, sample.py). Everything downstream
(rewards, scoring, metrics, eval) reads Rollouts. A rollout's structure comes from its tag tokens alone
(make_rollout): a tag spelled with ordinary sub-word pieces is text.
"""

from dataclasses import dataclass, field

import torch

from nanopr1 import UsageError
from nanopr1.attention import main_line, parse_blocks
from nanopr1.format import TAGS, tag_ids


# the request: a sample() call's options, and the checks it passes first
OFFICIAL_PATH_TOKENS = 4096  # official max_path_response_length (verl/training_scripts/rl_exp_s1.sh)


@dataclass(frozen=True)
class Options:
    """What a sample() call asks for. `rules` says how the budgets end a rollout's parts:

    official (verl/verl/parallel_thinking_generation_v3/parallel_thinking_loop_v3.py, the paper's runs):
      a path writes at most path_max_tokens tokens after its <Path>, then </Path> is forced if it has not
      closed (its two tags not counted); the rollout ends right after its max_blocks-th block's </Summary>;
      the response is cut at max_new_tokens wherever that falls, mid-block too: such a rollout has a
      format_error, and the trainer still reads the cut block's paths (attention.find_blocks(cut=True)).
    reserve (nanopr1's own): a block's paths share what is left of the budget minus `reserve` tokens kept
      for the summary and the answer, and the summary closes reserve // 2 tokens before the budget: every
      block closes, and the block limit only stops new blocks.
    """
    num_paths: int = 2              # paths per block
    max_blocks: int = 4             # blocks per rollout at most (official: the rollout ends after the last)
    max_new_tokens: int = 3000      # response budget: paths, summaries, inserted tags and answer included
    rules: str = "official"         # "official" or "reserve", above
    path_max_tokens: int = None     # official: a path's tokens between its tags (None: 4096); reserve: its
                                    # budget, its two tags included (None: its share of what is left)
    reserve: int = None             # reserve rules: tokens a block leaves for its summary and the answer
                                    # (None: min(64, max_new_tokens // 8))
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0
    seed: object = None             # an int, or one int per prompt (None: drawn from torch's generator)
    variant: str = "seen"           # how paths are merged: "seen" (re-encoded in sequence) or "unseen"
    parallel: bool = True           # False: no forking, tags are ordinary tokens
    force_block: object = False     # True: open a block after the first line (or 32 tokens); n: after n tokens
                                    # (0: the response starts with <Parallel>)
    max_prompt_tokens: int = None   # refuse longer prompts
    max_rows: int = None            # cache rows in flight (None: every rollout at once, as far as memory allows)


def check_request(model, prompts, opts):
    """Refuse a request the sampler cannot serve: bad options (ValueError), a prompt too long (UsageError)."""
    # options the sampler cannot serve (ValueError)
    reserve, need = opts.rules == "reserve", opts.num_paths if opts.parallel else 1  # need: rows of one rollout
    least = "2 (under reserve it counts its two tags)" if reserve else "1"
    checks = [(opts.variant in ("seen", "unseen"), f"variant must be 'seen' or 'unseen', not {opts.variant!r}"),
              (not opts.parallel or opts.num_paths >= 2, f"num_paths={opts.num_paths}: a block needs at least 2 paths"),
              (opts.rules in ("official", "reserve"), f"rules must be 'official' or 'reserve', not {opts.rules!r}"),
              (opts.path_max_tokens is None or opts.path_max_tokens >= 1 + reserve,
               f"path_max_tokens={opts.path_max_tokens}: at least {least}"),
              (opts.max_rows is None or opts.max_rows >= need,
               f"max_rows={opts.max_rows}: one rollout needs {need} rows"),
              (prompts and all(prompts), "every prompt needs at least one token")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    # the user's prompts: too long for the request or for the model's positions, one line each (UsageError)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    for p in prompts:
        if opts.max_prompt_tokens and len(p) > opts.max_prompt_tokens:
            raise UsageError(f"prompt of {len(p)} tokens is longer than max_prompt_tokens={opts.max_prompt_tokens}")
        if limit and len(p) + opts.max_new_tokens > limit:
            raise UsageError(f"prompt of {len(p)} tokens + max_new_tokens={opts.max_new_tokens} exceeds the "
                             f"model's {limit} positions: shorten the prompt or lower max_new_tokens")


# a rollout being written: the sampler's state of it, which only sampler.py changes
class Segment:
    """Tokens written by one cache row (the main line of a rollout, or one path), as five parallel lists:
    the columns of a Rollout."""

    def __init__(self):
        self.ids, self.forced, self.logprobs, self.positions, self.allowed = [], [], [], [], []

    def columns(self):
        return self.ids, self.forced, self.logprobs, self.positions, self.allowed

    def add(self, tok, forced, logprob, pos, allowed):
        # an inserted token is not the policy's: it gets no log-prob
        for column, x in zip(self.columns(), (tok, forced, 0.0 if forced else logprob, pos, allowed)):
            column.append(x)


@dataclass
class BlockState:  # the block a rollout is writing
    p: int            # position id of its <Parallel>
    budget: int       # tokens per path, its two tags included: </Path> is forced at the last
    room: int         # tokens the response still holds from the first <Path> on (what is past it is cut)
    n_prefix: int     # valid cache entries before the paths (shared by all path rows)
    paths: list       # one Segment per path
    done: int = 0     # paths finished (their rows park until the merge)


@dataclass(eq=False)
class RolloutState:  # one rollout being written
    prompt: list                                # the prompt token ids
    key: int                                    # the seed of its random stream (prompt seed, rollout of its group)
    force: object                               # None, or when to force the first <Parallel>: n tokens or "line"
    out: Segment = field(default_factory=Segment)  # the response so far, canonical layout
    phase: str = "main"                         # what it is writing: "main", "paths" or "summary"
    n_blocks: int = 0                           # blocks finished
    block: BlockState = None                    # the block being written
    stop: str = None                            # "eos" | "budget" | "max_blocks" once finished


# the tag mask: a token's `allowed` is a bitmask over TAGS, bit i for TAGS[i]
BIT = {t: 1 << i for i, t in enumerate(TAGS)}
ALL_TAGS = (1 << len(TAGS)) - 1


def apply_tag_mask(logits, allowed, tags):
    """Logits (..., V) with the tags not in `allowed` (..., bitmasks) at -inf: what the sampler saw."""
    # unpack each bitmask into one 0/1 per tag, then mask those tags' logits where it is 0
    keep = (allowed[..., None] >> torch.arange(len(TAGS), device=logits.device)) & 1  # (..., 6)
    idx = torch.tensor([tags[t] for t in TAGS], device=logits.device)
    logits = logits.clone()
    logits[..., idx] = logits[..., idx].masked_fill(keep == 0, float("-inf"))
    return logits


# the record: what the sampler returns, read by everything downstream
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
    stop_reason: str  # "eos" | "budget" | "max_blocks" (official rules: ended after its last block)
    main_text: str = ""       # the main line (no blocks, no summaries) decoded without special tokens
    format_error: str = None  # None if the tag tokens are well formed (always, when the sampler forks)
    plain_text: str = ""      # the whole response without special tokens: paths and summaries kept


def make_rollout(tokenizer, prompt, ids, stop_reason="eos", forced=None, logprobs=None, positions=None,
                 allowed=None):
    """A Rollout from its response ids, its structure read from the tag tokens alone."""
    n, tags = len(ids), tag_ids(tokenizer)
    # malformed tag tokens give no blocks and the reason (a response the budget cut mid-block, say)
    blocks, error = parse_blocks(ids, tags)
    # the EOS token is not text; the six tags are special tokens, so skipping those drops them too
    end = n - (stop_reason == "eos")
    main = [t for t, m in zip(ids[:end], main_line(ids[:end], tags)) if m]
    # three readings of the response: with its tags, its main line alone, and all of it without tags
    text = tokenizer.decode(ids[:end], skip_special_tokens=False)
    main_text = tokenizer.decode(main, skip_special_tokens=True)  # `42<|im_end|>` is read as 42
    plain_text = tokenizer.decode(ids[:end], skip_special_tokens=True)
    # a response built by hand (tests, the teacher's traces) is all sampled, at consecutive positions
    return Rollout(list(prompt), list(ids), forced or [False] * n, logprobs or [0.0] * n,
                   positions or list(range(len(prompt), len(prompt) + n)), allowed or [ALL_TAGS] * n,
                   blocks, text, stop_reason, main_text, error, plain_text)


# a rollout as a row to read: OUT/rollouts.jsonl, sample.py --json, and the tree that --show prints
def texts(rollout, tokenizer):
    """{"main": the main-text segments, "blocks": [{"paths": [...], "summary": ...}]}, tags stripped."""
    dec = lambda a, b: tokenizer.decode(rollout.ids[a:b], skip_special_tokens=False)
    # the main text between blocks: from the end of the last summary (prev) to the next <Parallel>
    main, blocks, prev = [], [], 0
    for b in rollout.blocks:
        main.append(dec(prev, b.parallel))
        # a path without its <Path> and </Path>, a summary without its two tags
        paths = [dec(s + 1, e - 1) for s, e in b.paths]
        blocks.append({"paths": paths, "summary": dec(b.summary[0] + 1, b.summary[1] - 1)})
        prev = b.summary[1]
    # the main text after the last block runs to the end of the response; the EOS token is not text
    main.append(dec(prev, len(rollout.ids) - (rollout.stop_reason == "eos")))
    return {"main": main, "blocks": blocks}


def rollout_row(rollout, tokenizer, grade, gold=None, step=None):
    """A rollout as a JSON row to read (OUT/rollouts.jsonl, tree); grade: rewards.reward_rollout's dict."""
    # the texts first (whole, then in parts), then what grading found
    return {"step": step, "prompt": tokenizer.decode(rollout.prompt_ids, skip_special_tokens=False),
            "response": rollout.text, **texts(rollout, tokenizer), "answer": grade["answer"], "gold": gold,
            "reward": grade["reward"], "correct": grade["correct"], "tokens": len(rollout.ids),
            "stop_reason": rollout.stop_reason}


def tree(row):
    """A rollout_row (or texts() with tokens / stop_reason / answer) as a printable tree."""
    main, blocks = row["main"], row["blocks"]
    indent = lambda text, prefix: "\n".join(prefix + line for line in text.strip("\n").split("\n"))
    # a heading line, the body, and the answer line (with the gold and the reward when graded against one)
    lines = [f"{row['tokens']} tokens, {len(blocks)} block(s), stop: {row['stop_reason']}"]
    # main text, then its k-th block, in turn: a block's paths, then its summary
    for k, segment in enumerate(main):
        lines += [indent(segment, "  ")] if segment.strip() else []
        if k < len(blocks):
            lines.append(f"  ┌─ parallel block {k + 1}")
            for j, path in enumerate(blocks[k]["paths"]):
                lines += [f"  ├─ path {j + 1}", indent(path, "  │    ")]
            lines += ["  └─ summary", indent(blocks[k]["summary"], "       ")]
    gold = f"   gold: {row['gold']}   reward: {row['reward']}" if row.get("gold") is not None else ""
    return "\n".join(lines + [f"answer: {row['answer']}{gold}"])
