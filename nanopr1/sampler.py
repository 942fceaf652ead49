"""
The branching sampler: every RL rollout and every evaluation goes through here.
Each token of a rollout, what it changes, and where (methods of _Sampler):

    token fed             what changes                                            where
    <Parallel> (main)     the row forks: N path rows share its KV cache           record -> fork
    </Path>   (a path)    the path row parks (kept, not fed) until its siblings   decode
    last </Path>          the rollout merges into path 1's row                    merge
    </Summary>            the block is recorded; back to the main text            record
    EOS (main text)       the rollout ends, its rows free up for new rollouts     record -> admit

- At most `max_rows` cache rows exist at once: rollouts are admitted as rows free
  up, each reserving num_paths rows, so a fork never waits. A prompt is prefilled
  once per admission (its other rollouts copy the row); all rows decode together.
- Merge. unseen: the later paths' KV entries are appended to path 1's row (no
  recompute), positions by the Multiverse rule (every <Path> at p+1, </Parallel>
  one past the longest path). seen: paths 2..N are re-encoded in path 1's row
  with sequential positions, as the Seen trainer's causal forward sees them.
- Tag mask (`tag_mask`): in the main text only <Parallel> may be sampled (while a
  block fits), in a path only </Path>, in a summary only </Summary>; the runtime
  inserts the others (`queue_due`), so every rollout is well formed. Each token
  records what was allowed, for the trainer (parallel=False: tags are text).
- Budgets: `max_new_tokens` counts every token. A block's paths share the budget
  left minus `reserve`; a summary is closed once reserve // 2 tokens are left, so
  the main text always has room for its `Final Answer:` line. EOS in a path or a
  summary closes it. Inserted tokens are `forced`: no policy loss, log-prob 0.
- Sampling is Gumbel-max with noise hashed from (prompt seed, rollout, path, token
  index): the same seeds give the same rollouts whatever the batch, the row cap
  or the number of processes. The recorded log-prob is that of the tag-masked
  distribution at the temperature (1 when greedy); top-p changes only the draw.

Adding a merge mode: change merge() (what the continuing row holds, which
positions are recorded) and attention.build_inputs (what the trainer sees).
"""

from dataclasses import dataclass

import torch
from tqdm import tqdm

from nanopr1 import UsageError, kvcache
from nanopr1.attention import BlockSpan
from nanopr1.format import PARALLEL, PARALLEL_END, PATH, PATH_END, SUMMARY, SUMMARY_END, end_of_turn_id
from nanopr1.model import tag_ids
from nanopr1.rollout import (ALL_TAGS, BIT, MAIN, PATHS, SUMMARY_PHASE, BlockState, RolloutState, RowState, Segment,
                             apply_tag_mask, gumbel, make_rollout, mix)


@dataclass(frozen=True)
class Options:
    num_paths: int = 2              # paths per block
    max_blocks: int = 4             # blocks per rollout at most
    max_new_tokens: int = 3000      # response budget: paths, summaries, inserted tags and answer included
    path_max_tokens: int = None     # one path's budget, its two tags included (None: its share of what is left)
    reserve: int = None             # tokens a block leaves for its summary and the answer (None: min(64, budget/8))
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0
    seed: object = None             # an int, or one int per prompt (None: drawn from torch's generator)
    variant: str = "seen"           # how paths are merged: "seen" (re-encoded in sequence) or "unseen"
    parallel: bool = True           # False: no forking, tags are ordinary tokens
    force_block: object = False     # True: open a block after the first line (or 32 tokens); n: after n tokens
                                    # (0: the response starts with <Parallel>)
    max_prompt_tokens: int = None   # refuse longer prompts
    max_rows: int = None            # cache rows in flight (None: every rollout at once, as far as memory allows)


# -----------------------------------------------------------------------------
# the sampler


class _Sampler:
    def __init__(self, model, tokenizer, prompts, group_size, o, cache, bar):
        self.model, self.tok, self.o, self.kv, self.bar = model, tokenizer, o, cache, bar
        self.device = next(model.parameters()).device
        self.tags = tag_ids(tokenizer)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos = {e for e in eos + [tokenizer.eos_token_id, end_of_turn_id(tokenizer)] if e is not None}
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos, default=0)
        self.reserve = o.reserve if o.reserve is not None else min(64, o.max_new_tokens // 8)
        force = None if o.force_block is False else ("line" if o.force_block is True else int(o.force_block))
        self.prompts, self.G = prompts, group_size
        seeds = o.seed if isinstance(o.seed, (list, tuple)) else [
            mix(o.seed if o.seed is not None else int(torch.randint(1 << 62, ())), i) for i in range(len(prompts))]
        self.rollouts = [RolloutState(list(p), mix(seeds[i], g), force)  # prompt-major
                         for i, p in enumerate(prompts) for g in range(group_size)]
        self.pending = list(range(len(self.rollouts)))  # rollouts not yet admitted, in order
        self.per_rollout = o.num_paths if o.parallel else 1  # rows each admitted rollout reserves
        self.reserved = 0
        self.rows = []      # RowState (or None: a free row) per cache row
        self.logits = None  # (len(rows), V) the logits each row samples its next token from
        self.ready = []     # rollouts whose paths have all finished: merge them next step

    def _alloc(self, n):
        """n free row slots (free rows are reused, the rest added)."""
        free = [i for i, w in enumerate(self.rows) if w is None][:n]
        extra = n - len(free)
        if extra:
            free += list(range(len(self.rows), len(self.rows) + extra))
            self.rows += [None] * extra
            self.kv.add_rows(extra)
            if self.logits is not None:
                self.logits = torch.cat([self.logits, self.logits.new_zeros(extra, self.logits.shape[1])])
        assert len(self.rows) <= self.o.max_rows
        return free

    # 1) admit: prefill the prompts of the next rollouts while rows are free
    def admit(self):
        k = min(len(self.pending), (self.o.max_rows - self.reserved) // self.per_rollout)
        if k <= 0:
            return
        new, self.pending = self.pending[:k], self.pending[k:]
        self.reserved += k * self.per_rollout
        slots = self._alloc(k)
        first = {}  # prompt index -> the slot of its first new rollout: prefilled, the others copy it
        for j, r in zip(slots, new):
            first.setdefault(r // self.G, j)
        prompts = [self.prompts[i] for i in first]
        P = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad] * (P - len(p)) + p for p in prompts])  # (n, P) left-padded
        pos = torch.tensor([[0] * (P - len(p)) + list(range(len(p))) for p in prompts])
        q_valid = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts])
        logits = self.kv.prefill(self.model, ids, pos, q_valid, list(first.values()))  # (n, V)
        if self.logits is None:
            self.logits = logits.new_zeros(len(self.rows), logits.shape[1])
        which = {i: k for k, i in enumerate(first)}
        for j, r in zip(slots, new):
            i = r // self.G
            if j != first[i]:
                self.kv.copy_row(first[i], j)
            ro = self.rollouts[r]
            self.rows[j] = RowState(ro, None, ro.out, len(ro.prompt))
        self.logits[torch.tensor(slots)] = logits[torch.tensor([which[r // self.G] for r in new])]

    # 2) fork: clone the KV cache of the prefix into one row per path
    def fork(self):
        N = self.o.num_paths
        for i, w in [(i, w) for i, w in enumerate(self.rows) if w is not None and w.fork]:
            ro = w.ro
            left = self.o.max_new_tokens - len(ro.out.ids) - 3 - self.reserve  # keep </Parallel><Summary></Summary>
            budget = min(self.o.path_max_tokens or left, left // N)
            b = ro.block = BlockState(len(ro.out.ids) - 1, w.pos - 1, budget, int(self.kv.valid[i].sum()),
                                  [Segment() for _ in range(N)])
            for k, j in enumerate([i] + self._alloc(N - 1)):
                if j != i:
                    self.kv.copy_row(i, j)
                self.rows[j] = RowState(ro, k, b.paths[k], b.p + 1, [self.tags[PATH]])

    # 3) merge: each rollout whose paths have all finished continues in its first path's row
    def merge(self):
        if not self.ready:
            return
        ready, self.ready, unseen = self.ready, [], self.o.variant == "unseen"
        where = {(w.ro, w.path): i for i, w in enumerate(self.rows) if w is not None and w.parked}
        rows = [[where[(ro, k)] for k in range(len(ro.block.paths))] for ro in ready]  # each rollout's path rows
        if unseen:  # paths 2..N's own entries appended after path 1's (prefix + path 1)
            for ro, r in zip(ready, rows):
                self.kv.merge(r[0], r[1:], ro.block.n_prefix)
        else:  # re-encode paths 2..N after path 1, sequential positions
            later = [sum((seg.ids for seg in ro.block.paths[1:]), []) for ro in ready]
            start = [ro.block.p + len(ro.block.paths[0].ids) + 1 for ro in ready]
            Q = max(len(x) for x in later)
            if Q:  # (n, Q) right-padded
                ids, pos = torch.tensor([x + [self.pad] * (Q - len(x)) for x in later]), torch.tensor(start)[:, None]
                q_valid = torch.arange(Q)[None] < torch.tensor([len(x) for x in later])[:, None]
                self.kv.extend(self.model, ids, pos + torch.arange(Q)[None], q_valid, [r[0] for r in rows])
        for ro, r in zip(ready, rows):  # the paths into the response, in canonical layout
            for j in r[1:]:
                self.rows[j] = None
                self.kv.free(j)
            b, nxt, spans = ro.block, ro.block.p + 1, []
            for seg in b.paths:
                ids, forced, logprobs, positions, allowed = seg.columns()
                positions = positions if unseen else range(nxt, nxt + len(ids))
                spans.append((len(ro.out.ids), len(ro.out.ids) + len(ids)))
                for column in zip(ids, forced, logprobs, positions, allowed):
                    ro.out.add(*column)
                nxt += len(ids)
            b.spans, b.summary = spans, len(ro.out.ids) + 1
            pos = b.p + 1 + max(len(seg.ids) for seg in b.paths) if unseen else nxt  # of </Parallel>
            self.rows[r[0]] = RowState(ro, None, ro.out, pos, [self.tags[PARALLEL_END], self.tags[SUMMARY]])
            ro.phase = SUMMARY_PHASE

    # 4) choose: the forced tokens that are due, the tag mask, then sample
    def can_open(self, ro):
        """Would a block opened now leave each path 3 tokens (after the closing tags and the reserve)?"""
        left = self.o.max_new_tokens - len(ro.out.ids) - 1 - 3 - self.reserve
        return len(ro.blocks) < self.o.max_blocks and left // self.o.num_paths >= 3

    def tag_mask(self, w):
        """The tags row w may sample (a bitmask over format.TAGS)."""
        if w.path is not None:
            return BIT[PATH_END]
        if w.ro.phase == SUMMARY_PHASE:
            return BIT[SUMMARY_END]
        return BIT[PARALLEL] if self.can_open(w.ro) else 0

    def queue_due(self, w):
        """Queue the forced token that is due now: a budget's closing tag, or a forced block."""
        ro = w.ro
        if w.queue:
            return
        if w.path is not None:
            if len(w.seg.ids) >= ro.block.budget - 1:
                w.queue.append(self.tags[PATH_END])
        elif ro.phase == SUMMARY_PHASE:
            if len(ro.out.ids) >= self.o.max_new_tokens - 1 - self.reserve // 2:
                w.queue.append(self.tags[SUMMARY_END])
        elif ro.force is not None and not ro.blocks and self.can_open(ro) and self._force_now(ro):
            w.queue.append(self.tags[PARALLEL])
            ro.force = None

    def _force_now(self, ro):
        if ro.force == "line":
            return len(ro.out.ids) >= 32 or (ro.out.ids and "\n" in self.tok.decode(ro.out.ids[-1:]))
        return len(ro.out.ids) >= ro.force

    def choose(self):
        bits, logits = [ALL_TAGS] * len(self.rows), self.logits  # parallel=False: tags are ordinary tokens
        if self.o.parallel:
            for i, w in enumerate(self.rows):
                if w is not None and not w.parked:
                    self.queue_due(w)
                    bits[i] = self.tag_mask(w)
            logits = apply_tag_mask(logits, torch.tensor(bits, device=self.device), self.tags)
        temperature, top_p = self.o.temperature, self.o.top_p
        logp = torch.log_softmax(logits / (temperature or 1), -1)  # (R, V); greedy: temperature 1
        if temperature == 0:
            tok = logp.argmax(-1)
        else:  # one token per row from exp(logp), restricted to the smallest set of mass >= top_p
            scores = logp
            if top_p < 1.0:
                sorted_p, idx = logp.exp().sort(-1, descending=True)
                cut = (sorted_p.cumsum(-1) - sorted_p) >= top_p  # (R, V) outside the top-p set
                scores = logp.masked_fill(torch.zeros_like(cut).scatter_(-1, idx, cut), float("-inf"))
            keys = [w.noise_key() if w is not None and not w.parked else 0 for w in self.rows]
            tok = (scores + gumbel(torch.tensor(keys, device=self.device), logp.shape[1])).argmax(-1)
        out = torch.stack([tok.to(logp.dtype), logp.gather(1, tok[:, None])[:, 0]]).tolist()  # one host sync
        return [int(t) for t in out[0]], out[1], bits

    # 5) record each row's token and advance its phase
    def record(self, toks, logps, bits):
        feed = [None] * len(self.rows)
        for i, w in enumerate(self.rows):
            if w is None or w.parked:
                continue
            ro, forced = w.ro, bool(w.queue)
            tok, lp = (w.queue.pop(0), 0.0) if forced else (toks[i], logps[i])
            if not forced and tok in self.eos and self.o.parallel:
                if w.path is not None or ro.phase == SUMMARY_PHASE:  # EOS ends a path or a summary
                    tok, forced = self.tags[PATH_END] if w.path is not None else self.tags[SUMMARY_END], True
                elif ro.force is not None and bits[i]:  # a forced block is still due: open it instead of stopping
                    tok, forced, ro.force = self.tags[PARALLEL], True, None
            w.seg.add(tok, forced, lp, w.pos, bits[i])
            w.pos += 1
            if w.path is None and tok in self.eos and not forced:
                self._finish(i, "eos")
                continue
            feed[i] = tok
            if self.o.parallel:
                if w.path is not None:
                    w.closing = tok == self.tags[PATH_END]
                elif ro.phase == MAIN and tok == self.tags[PARALLEL]:
                    w.fork, ro.phase = True, PATHS
                    continue
                elif ro.phase == SUMMARY_PHASE and tok == self.tags[SUMMARY_END]:
                    ro.blocks.append(BlockSpan(ro.block.parallel, ro.block.spans, (ro.block.summary, len(ro.out.ids))))
                    ro.phase, ro.block = MAIN, None
            if w.path is None and len(ro.out.ids) >= self.o.max_new_tokens:
                self._finish(i, "budget")
                feed[i] = None
        return feed

    def _finish(self, i, reason):
        self.rows[i].ro.stop = reason
        self.rows[i] = None
        self.kv.free(i)
        self.reserved -= self.per_rollout
        self.bar.update(1)

    # 6) decode: one forward of every row (rows with nothing to feed get an invalid column)
    def decode(self, feed):
        ids = torch.tensor([[t if t is not None else self.pad] for t in feed])  # (R, 1) on the host: the
        pos = torch.tensor([[w.pos - 1 if t is not None else 0] for t, w in zip(feed, self.rows)])  # cache moves them
        fed = torch.tensor([[t is not None] for t in feed])
        self.logits = self.kv.step(self.model, ids, pos, fed)  # (R, V)
        for w in self.rows:
            if w is not None and w.closing:  # a finished path: park its row until its siblings finish
                w.closing, w.parked = False, True
                w.ro.block.done += 1
                if w.ro.block.done == len(w.ro.block.paths):
                    self.ready.append(w.ro)

    # 7) compact: drop free rows (and dead columns) once the cache says it pays
    def compact(self):
        keep = [i for i, w in enumerate(self.rows) if w is not None]
        if self.kv.compact_due(len(keep)):
            self.kv.compact(keep)
            self.rows, self.logits = [self.rows[i] for i in keep], self.logits[keep]

    def rollout(self, ro):
        r = make_rollout(self.tok, ro.prompt, ro.out.ids, ro.stop, *ro.out.columns()[1:])
        assert not self.o.parallel or (r.blocks == ro.blocks and r.format_error is None), "sampler bug"
        return r


def _check(model, prompts, o):
    checks = [(o.variant in ("seen", "unseen"), f"variant must be 'seen' or 'unseen', not {o.variant!r}"),
              (not o.parallel or o.num_paths >= 2, f"num_paths={o.num_paths}: a parallel block needs at least 2 paths"),
              (o.path_max_tokens is None or o.path_max_tokens >= 2, "path_max_tokens counts its two tags: at least 2"),
              (o.max_rows is None or o.max_rows >= (o.num_paths if o.parallel else 1),
               f"max_rows={o.max_rows}: one rollout needs {o.num_paths if o.parallel else 1} rows"),
              (prompts and all(prompts), "every prompt needs at least one token")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    for p in prompts:  # the user's prompts: one-line errors
        if o.max_prompt_tokens and len(p) > o.max_prompt_tokens:
            raise UsageError(f"prompt of {len(p)} tokens is longer than max_prompt_tokens={o.max_prompt_tokens}")
        if limit and len(p) + o.max_new_tokens > limit:
            raise UsageError(f"prompt of {len(p)} tokens + max_new_tokens={o.max_new_tokens} exceeds the "
                             f"model's {limit} positions: shorten the prompt or lower max_new_tokens")


@torch.inference_mode()
def sample(model, tokenizer, prompts, group_size=1, *, cache=None, progress=False, **options):
    """Rollouts for a batch of prompts (lists of token ids), `group_size` per prompt, prompt-major.

    options: the fields of Options. cache: a kvcache.KVCache to use (a run keeps one, and its graphs, for
    all its calls); else one is made for this call. force_block is for showing a block with any model (a
    model that would stop first gets the block instead), not for training."""
    o = Options(**options)
    prompts = [list(p) for p in prompts]
    _check(model, prompts, o)
    kv, max_rows = kvcache.for_call(model, o, prompts, group_size, cache)
    o = Options(**{**o.__dict__, "max_rows": max_rows})
    bar = tqdm(total=len(prompts) * group_size, desc="rollouts", disable=not progress)
    run = _Sampler(model, tokenizer, prompts, group_size, o, kv, bar)
    while run.pending or any(w is not None for w in run.rows):
        run.admit()                                        # 1) admit new rollouts: prefill their prompts
        run.fork()                                         # 2) fork: clone the KV cache into the path rows
        run.merge()                                        # 3) merge finished paths into the first path's row
        toks, logps, bits = run.choose()                   # 4) choose: forced tokens, tag mask, sample
        feed = run.record(toks, logps, bits)               # 5) record tokens, advance phases
        if any(t is not None for t in feed):
            run.decode(feed)                               # 6) decode: one forward of all live rows
        run.compact()                                      # 7) compact the cache now and then
    bar.close()
    return [run.rollout(ro) for ro in run.rollouts]
