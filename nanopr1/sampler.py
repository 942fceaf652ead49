"""
The branching sampler: every RL rollout and every evaluation goes through here.

A rollout is decoded as a small state machine (DESIGN.md section 4):

    MAIN ──<Parallel>──> FORK ──> PATHS ──all </Path>──> MERGE ──> SUMMARY ──</Summary>──> MAIN

- each prompt is prefilled once, not once per rollout of its group;
- FORK clones the prefix's KV cache (kvcache.py) into one row per path (no
  re-prefill) and forces `<Path>` into each;
- every live row (main line, path or summary of any rollout) is decoded
  together: one forward per step;
- MERGE builds one row that continues the rollout, then forces
  `</Parallel><Summary>`. unseen: the paths' KV entries are concatenated after
  the prefix (no recompute), positions by the Multiverse rule (every `<Path>`
  at p+1, `</Parallel>` one past the longest path). seen: paths 2..N are
  re-encoded after path 1's row with sequential positions, so what follows sees
  exactly what the Seen trainer's causal forward sees.

Tag mask (parallel=True): in the main text only `<Parallel>` may be sampled
(not after `max_blocks` blocks, nor without room for a block), in a path only
`</Path>`, in a summary only `</Summary>`; the other tags are only inserted by
the runtime, so every rollout is well formed. Each token records the tags
allowed when it was sampled (`allowed`, a bitmask over format.TAGS) and the
trainer applies the same mask (`apply_tag_mask`). parallel=False: tags are
ordinary tokens (the cold-start teacher writes them as text).

Budgets: `max_new_tokens` counts every response token. A block opens only if
3 tokens per path plus the three closing tags still fit; each path gets
min(path_max_tokens, its share of what is left) tokens, its two tags included,
then `</Path>` is forced; `</Summary>` is forced at the budget's last token. EOS
in a path or summary is replaced by its closing tag. Runtime-inserted tokens
are `forced`: no policy loss, log-prob 0.

A sampled token's log-prob is log_softmax(tag-masked logits / temperature)
(temperature 1 when greedy); top-p changes what is sampled, not what is
recorded. Seen rollouts record sequential positions (the scorer's); paths 2..N
of a Seen block were sampled without seeing path 1, so only their log-probs
differ from a plain causal forward (by design, DESIGN.md 5).
"""

from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from nanopr1.attention import BlockSpan, main_line, structure
from nanopr1.format import PARALLEL, PARALLEL_END, PATH, PATH_END, SUMMARY, SUMMARY_END, TAGS
from nanopr1.kvcache import KVRows, StaticRows
from nanopr1.model import tag_ids

BIT = {t: 1 << i for i, t in enumerate(TAGS)}  # bit i of `allowed` = TAGS[i]
ALL_TAGS = (1 << len(TAGS)) - 1
MAIN, PATHS, SUMMARY_PHASE = "main", "paths", "summary"


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
    main_text: str = ""       # decoded main-line tokens (outside blocks and summaries, EOS excluded);
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

# -----------------------------------------------------------------------------
# the state of a rollout in progress


class _Seg:
    """Tokens written by one row (the main line of a rollout, or one path), as five parallel lists."""

    def __init__(self):
        self.ids, self.forced, self.logprobs, self.positions, self.allowed = [], [], [], [], []

    def add(self, tok, forced, logprob, pos, allowed):
        for column, x in zip((self.ids, self.forced, self.logprobs, self.positions, self.allowed),
                             (tok, forced, 0.0 if forced else logprob, pos, allowed)):
            column.append(x)


@dataclass
class _Block:  # the block a rollout is writing
    parallel: int   # response index of <Parallel>
    p: int          # its position id
    budget: int     # tokens per path, its two tags included
    n_prefix: int   # cache entries before the paths (shared by all path rows)
    paths: list     # one _Seg per path
    stash: list     # per path: its KV entries once finished (None where not needed)
    done: int = 0   # paths finished
    spans: list = None  # (start, end) of each path in the response, set at the merge
    summary: int = 0  # response index of <Summary>


@dataclass
class _State:
    prompt: list
    force: object   # None, or when to force the first <Parallel>: an int (response tokens) or "line"
    out: _Seg = field(default_factory=_Seg)
    phase: str = MAIN
    blocks: list = field(default_factory=list)
    block: _Block = None
    stop: str = None


@dataclass
class _Row:  # one cache row: the main line of a rollout (path None) or one of its paths
    s: _State
    path: object  # None or the path index
    seg: _Seg
    pos: int      # position id of the next token fed
    queue: list   # forced tokens to insert next
    fork: bool = False     # <Parallel> was just fed: fork before the next token
    closing: bool = False  # </Path> is being fed: stash the path after this forward

# -----------------------------------------------------------------------------
# the sampler


class _Sampler:
    def __init__(self, model, tokenizer, opt, bar):
        self.model, self.tok, self.o = model, tokenizer, opt
        self.device = next(model.parameters()).device
        self.tags = tag_ids(tokenizer)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos = {e for e in eos + [tokenizer.eos_token_id] if e is not None}
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos, default=0)
        self.gen = None if opt["seed"] is None else torch.Generator(device=self.device).manual_seed(opt["seed"])
        self.bar = bar  # progress: rollouts finished
        self.ready = []  # rollouts whose paths have all finished: merge them next step

    # 1) prefill: each prompt once, left-padded, then one row per rollout of its group
    def prefill(self, prompts, group_size):
        P = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad] * (P - len(p)) + p for p in prompts], device=self.device)  # (n, P)
        pos = torch.tensor([[0] * (P - len(p)) + list(range(len(p))) for p in prompts], device=self.device)
        q_valid = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts], device=self.device)
        rep = torch.arange(len(prompts)).repeat_interleave(group_size)  # row j is prompt rep[j]
        cache = StaticRows if self.o["fast"] else KVRows
        max_rows = len(rep) * (self.o["num_paths"] if self.o["parallel"] else 1)  # at most N rows per rollout
        max_cols = P + self.o["max_new_tokens"] + 1
        self.kv, self.logits = cache.prefill(self.model, ids, pos, q_valid, rep, max_rows, max_cols)  # logits (R, V)
        force = self.o["force_block"]
        force = None if force is False else ("line" if force is True else int(force))
        self.states = [_State(list(p), force) for p in prompts for _ in range(group_size)]
        self.rows = [_Row(s, None, s.out, len(s.prompt), []) for s in self.states]

    def _alloc(self, n):
        """n free row slots (free rows are reused, the rest appended)."""
        free = [i for i, w in enumerate(self.rows) if w is None][:n]
        extra = n - len(free)
        if extra:
            free += list(range(len(self.rows), len(self.rows) + extra))
            self.rows += [None] * extra
            self.kv.grow(rows=extra)
            self.logits = torch.cat([self.logits, self.logits.new_zeros(extra, self.logits.shape[1])])
        return free

    # 2) fork: clone the KV cache of the prefix into one row per path
    def fork(self):
        N = self.o["num_paths"]
        for i, w in [(i, w) for i, w in enumerate(self.rows) if w is not None and w.fork]:
            left = self.o["max_new_tokens"] - len(w.s.out.ids) - 3  # keep </Parallel><Summary></Summary>
            budget = min(self.o["path_max_tokens"] or left, left // N)
            b = w.s.block = _Block(len(w.s.out.ids) - 1, w.pos - 1, budget, int(self.kv.valid[i].sum()),
                                   [_Seg() for _ in range(N)], [None] * N)
            for k, j in enumerate([i] + self._alloc(N - 1)):
                if j != i:
                    self.kv.copy_row(i, j)
                self.rows[j] = _Row(w.s, k, b.paths[k], b.p + 1, [self.tags[PATH]])

    # 3) merge: one row continues each rollout whose paths have all finished
    def merge(self):
        if not self.ready:
            return
        ready, self.ready, unseen = self.ready, [], self.o["variant"] == "unseen"
        stash = [s.block.stash if unseen else s.block.stash[:1] for s in ready]  # seen: path 1's row alone
        entries = [[torch.cat(layer, 1) for layer in zip(*st)] for st in stash]  # unseen: + paths 2..N's own
        slots = self._alloc(len(ready))
        self.kv.put(slots, entries)
        if not unseen:  # re-encode paths 2..N after path 1, sequential positions
            later = [sum((seg.ids for seg in s.block.paths[1:]), []) for s in ready]
            start = [s.block.p + len(s.block.paths[0].ids) + 1 for s in ready]
            Q = max(len(x) for x in later)
            if Q:
                ids = torch.tensor([x + [self.pad] * (Q - len(x)) for x in later])
                pos = torch.tensor([[a + j for j in range(Q)] for a in start])
                q_valid = torch.tensor([[j < len(x) for j in range(Q)] for x in later])
                self.kv.forward(self.model, ids, pos, q_valid, rows=slots)
        for s, j in zip(ready, slots):  # the paths into the response, in canonical layout
            b, nxt, spans = s.block, s.block.p + 1, []
            for seg in b.paths:
                positions = seg.positions if unseen else list(range(nxt, nxt + len(seg.ids)))
                spans.append((len(s.out.ids), len(s.out.ids) + len(seg.ids)))
                for tok, f, lp, pos, a in zip(seg.ids, seg.forced, seg.logprobs, positions, seg.allowed):
                    s.out.add(tok, f, lp, pos, a)
                nxt += len(seg.ids)
            b.spans, b.summary = spans, len(s.out.ids) + 1
            pos = b.p + 1 + max(len(seg.ids) for seg in b.paths) if unseen else nxt  # of </Parallel>
            self.rows[j] = _Row(s, None, s.out, pos, [self.tags[PARALLEL_END], self.tags[SUMMARY]])
            s.phase = SUMMARY_PHASE

    # 4) choose: which tags each row may sample, and which tokens are forced
    def _force_now(self, s):
        if s.force == "line":
            return len(s.out.ids) >= 32 or (s.out.ids and "\n" in self.tok.decode(s.out.ids[-1:]))
        return len(s.out.ids) >= s.force

    def allowed(self, w):
        if w.path is not None:
            if not w.queue and len(w.seg.ids) >= w.s.block.budget - 1:
                w.queue.append(self.tags[PATH_END])
            return BIT[PATH_END]
        if w.s.phase == SUMMARY_PHASE:
            if not w.queue and len(w.s.out.ids) >= self.o["max_new_tokens"] - 1:
                w.queue.append(self.tags[SUMMARY_END])
            return BIT[SUMMARY_END]
        room = self.o["max_new_tokens"] - len(w.s.out.ids) - 1  # a block needs 3 tokens a path + 3 tags
        if len(w.s.blocks) >= self.o["max_blocks"] or room < 3 * self.o["num_paths"] + 3:
            return 0
        if w.s.force is not None and not w.s.blocks and self._force_now(w.s):
            w.queue.append(self.tags[PARALLEL])
            w.s.force = None
        return BIT[PARALLEL]

    def choose(self):
        bits, logits = [ALL_TAGS] * len(self.rows), self.logits  # parallel=False: tags are ordinary tokens
        if self.o["parallel"]:
            bits = [self.allowed(w) if w is not None else ALL_TAGS for w in self.rows]
            logits = apply_tag_mask(logits, torch.tensor(bits, device=self.device), self.tags)
        T, top_p = self.o["temperature"], self.o["top_p"]
        logp = torch.log_softmax(logits / (T or 1), -1)  # (R, V); greedy: temperature 1
        if T == 0:
            tok = logp.argmax(-1)
        else:  # one token per row from exp(logp), restricted to the smallest set of mass >= top_p
            probs = logp.exp()  # (R, V)
            if top_p < 1.0:
                sorted_p, idx = probs.sort(-1, descending=True)
                sorted_p[(sorted_p.cumsum(-1) - sorted_p) >= top_p] = 0.0
                probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
            tok = torch.multinomial(probs, 1, generator=self.gen)[:, 0]
        out = torch.stack([tok.to(logp.dtype), logp.gather(1, tok[:, None])[:, 0]]).tolist()  # one host sync
        return [int(t) for t in out[0]], out[1], bits

    # 5) record each row's token and advance its phase
    def record(self, toks, logps, bits):
        feed = [None] * len(self.rows)
        for i, w in [(i, w) for i, w in enumerate(self.rows) if w is not None]:
            s, forced = w.s, bool(w.queue)
            tok, lp = (w.queue.pop(0), 0.0) if forced else (toks[i], logps[i])
            if not forced and tok in self.eos and self.o["parallel"]:
                if w.path is not None or s.phase == SUMMARY_PHASE:  # EOS ends a path or a summary
                    tok, forced = self.tags[PATH_END] if w.path is not None else self.tags[SUMMARY_END], True
                elif s.force is not None and bits[i]:  # a forced block is still due: open it instead of stopping
                    tok, forced, s.force = self.tags[PARALLEL], True, None
            w.seg.add(tok, forced, lp, w.pos, bits[i])
            w.pos += 1
            if w.path is None and tok in self.eos and not forced:
                self._finish(i, "eos")
                continue
            feed[i] = tok
            if self.o["parallel"]:
                if w.path is not None:
                    w.closing = tok == self.tags[PATH_END]
                elif s.phase == MAIN and tok == self.tags[PARALLEL]:
                    w.fork, s.phase = True, PATHS
                    continue
                elif s.phase == SUMMARY_PHASE and tok == self.tags[SUMMARY_END]:
                    s.blocks.append(BlockSpan(s.block.parallel, s.block.spans, (s.block.summary, len(s.out.ids))))
                    s.phase, s.block = MAIN, None
            if w.path is None and len(s.out.ids) >= self.o["max_new_tokens"]:
                self._finish(i, "budget")
                feed[i] = None
        return feed

    def _finish(self, i, reason):
        self.rows[i].s.stop = reason
        self.rows[i] = None
        self.kv.free(i)
        self.bar.update(1)

    # 6) decode: one forward of every live row
    def decode(self, feed):
        ids = torch.tensor([[t if t is not None else self.pad] for t in feed])  # (R, 1) on the host: the
        pos = torch.tensor([[w.pos - 1 if t is not None else 0] for t, w in zip(feed, self.rows)])  # cache moves them
        q_valid = torch.tensor([[t is not None] for t in feed])
        self.logits = self.kv.forward(self.model, ids, pos, q_valid)  # (R, V)
        for i, w in enumerate(self.rows):
            if w is not None and w.closing:  # a finished path: stash what the merge needs, free its row
                b = w.s.block
                if w.path == 0 or self.o["variant"] == "unseen":
                    b.stash[w.path] = self.kv.entries(i, 0 if w.path == 0 else b.n_prefix)
                self.rows[i] = None
                self.kv.free(i)
                b.done += 1
                if b.done == len(b.paths):
                    self.ready.append(w.s)

    # 7) compact: drop free rows (and dead columns) once the cache says it pays
    def compact(self):
        keep = [i for i, w in enumerate(self.rows) if w is not None]
        if self.kv.compact_due(len(keep), len(self.rows)):
            self.kv.compact(keep)
            self.rows, self.logits = [self.rows[i] for i in keep], self.logits[keep]

    def rollout(self, s):
        r = make_rollout(self.tok, s.prompt, s.out.ids, s.stop, s.out.forced, s.out.logprobs, s.out.positions,
                         s.out.allowed)
        assert not self.o["parallel"] or (r.blocks == s.blocks and r.format_error is None), "sampler bug"
        return r


def make_rollout(tokenizer, prompt, ids, stop_reason="eos", forced=None, logprobs=None, positions=None, allowed=None):
    """A Rollout from its response token ids; its structure (blocks, format_error, main_text) is read
    from the tag tokens alone. The sampler builds every rollout here; tests build rollouts by hand
    (the per-token lists default to: sampled, log-prob 0, sequential positions, every tag allowed)."""
    n, tags = len(ids), tag_ids(tokenizer)
    blocks, error = structure(ids, tags)
    end = n - (stop_reason == "eos")  # the EOS token is not text
    main = [t for t, m in zip(ids[:end], main_line(ids[:end], tags)) if m]
    decode = lambda x: tokenizer.decode(x, skip_special_tokens=False)
    return Rollout(list(prompt), list(ids), forced or [False] * n, logprobs or [0.0] * n,
                   positions or list(range(len(prompt), len(prompt) + n)), allowed or [ALL_TAGS] * n,
                   blocks, decode(ids[:end]), stop_reason, decode(main), error)


def _check(model, prompts, o):
    if o["variant"] not in ("seen", "unseen"):
        raise ValueError(f"variant must be 'seen' or 'unseen', not {o['variant']!r}")
    if o["parallel"] and o["num_paths"] < 2:
        raise ValueError(f"num_paths={o['num_paths']}: a parallel block needs at least 2 paths")
    if o["path_max_tokens"] is not None and o["path_max_tokens"] < 2:
        raise ValueError("path_max_tokens counts the path's two tags: it must be at least 2")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    for p in prompts:
        if o["max_prompt_tokens"] and len(p) > o["max_prompt_tokens"]:
            raise ValueError(f"prompt of {len(p)} tokens is longer than max_prompt_tokens={o['max_prompt_tokens']}")
        if limit and len(p) + o["max_new_tokens"] > limit:
            raise ValueError(f"prompt of {len(p)} tokens + max_new_tokens={o['max_new_tokens']} exceeds the "
                             f"model's {limit} positions: shorten the prompt or lower max_new_tokens")


@torch.inference_mode()
def sample(model, tokenizer, prompts, group_size=1, *, num_paths=2, max_blocks=4, max_new_tokens=3000,
           path_max_tokens=None, temperature=1.0, top_p=1.0, seed=None, variant="seen", parallel=True,
           force_block=False, progress=False, max_prompt_tokens=None, fast=False):
    """Rollouts for a batch of prompts (lists of token ids), `group_size` per prompt, prompt-major.

    force_block (to show or benchmark a block with any model; not for training): False; True = open a
    block after the first line of the main text (or after 32 tokens); an int n = after n response tokens
    (0: the response starts with <Parallel>). A model that would stop before that gets the block instead.
    temperature 0 = greedy. fast=True: kvcache.StaticRows (CUDA graphs), same tokens and log-probs at temperature 0.
    """
    o = dict(num_paths=num_paths, max_blocks=max_blocks, max_new_tokens=max_new_tokens,
             path_max_tokens=path_max_tokens, temperature=temperature, top_p=top_p, seed=seed, variant=variant,
             parallel=parallel, force_block=force_block, max_prompt_tokens=max_prompt_tokens, fast=fast)
    prompts = [list(p) for p in prompts]
    _check(model, prompts, o)
    run = _Sampler(model, tokenizer, o, tqdm(total=len(prompts) * group_size, desc="rollouts", disable=not progress))
    run.prefill(prompts, group_size)                       # 1) prefill each prompt once
    while any(w is not None for w in run.rows) or run.ready:
        run.fork()                                         # 2) fork: clone the KV cache into the path rows
        run.merge()                                        # 3) merge finished paths into one row
        toks, logps, bits = run.choose()                   # 4) choose: tag mask, sample or force
        feed = run.record(toks, logps, bits)               # 5) record tokens, advance phases
        if any(t is not None for t in feed):
            run.decode(feed)                               # 6) decode: one forward of all live rows
        run.compact()                                      # 7) compact the cache now and then
    run.bar.close()
    return [run.rollout(s) for s in run.states]
