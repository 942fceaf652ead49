"""
The branching sampler: every RL rollout and every evaluation goes through here (docs/design.md,
"Sampling"). Each token of a rollout, what it changes, and where (methods of _Sampler):

    token fed             what changes                                            where
    <Parallel> (main)     the row forks: N path rows share its KV cache           record -> fork
    </Path>   (a path)    the path row parks (kept, not fed) until its siblings   decode
    last </Path>          path 1's row takes over: </Parallel> nl <Summary> forced  merge
    </Summary>            the block is recorded; back to the main text            record
    EOS (main text)       the rollout ends, its rows free up for new rollouts     record -> admit

What a call takes (Options, its budget `rules`), checks (check_request) and returns (Rollout): rollout.py.
"""

from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from nanopr1 import kvcache
from nanopr1.attention import BlockSpan, find_blocks
from nanopr1.format import PARALLEL, PARALLEL_END, PATH, PATH_END, SUMMARY, SUMMARY_END, end_of_turn_id, gap_ids
from nanopr1.model import tag_ids
from nanopr1.rollout import (ALL_TAGS, BIT, OFFICIAL_PATH_TOKENS, Options, apply_tag_mask, check_request, draw,
                             make_rollout, mix)


# rollouts in progress: their state, which only this file changes
class Phase:  # what a rollout is writing
    MAIN, PATHS, SUMMARY = "main", "paths", "summary"


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
    budget: int       # tokens per path, its two tags included: </Path> is forced at the last
    room: int         # tokens the response still holds from the first <Path> on (what is past it is cut)
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
    phase: str = Phase.MAIN                     # what it is writing
    blocks: list = field(default_factory=list)  # finished blocks (BlockSpan)
    block: BlockState = None                    # the block being written
    stop: str = None                            # "eos" | "budget" | "max_blocks" once finished


@dataclass(eq=False)
class RowState:  # one cache row: the main line of a rollout (path None) or one of its paths
    rollout: RolloutState                       # the rollout it writes
    path: object                                # None or the path index
    seg: Segment                                # where its tokens go: rollout.out, or its path's segment
    pos: int                                    # position id of the next token fed
    queue: list = field(default_factory=list)   # forced tokens to insert next
    fork: bool = False                          # <Parallel> was just fed: fork before the next token
    closing: bool = False                       # </Path> is being fed: the path ends after this forward
    parked: bool = False                        # a finished path: not fed, kept for the merge

    def noise_key(self):
        """The key of the row's next draw, new at each draw: the main line's index, or a path's place."""
        r = self.rollout
        if self.path is None:
            return mix(r.key, len(r.out.ids))
        return mix(r.key, len(r.blocks), self.path, len(self.seg.ids), -1)


# the sampler
class _Sampler:
    def __init__(self, model, tokenizer, prompts, group_size, opts, cache, bar):
        self.model, self.tok, self.opts, self.kv, self.bar = model, tokenizer, opts, cache, bar
        self.device = next(model.parameters()).device
        self.tags = tag_ids(tokenizer)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos = {e for e in eos + [tokenizer.eos_token_id, end_of_turn_id(tokenizer)] if e is not None}
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos, default=0)
        self.reserve = opts.reserve if opts.reserve is not None else min(64, opts.max_new_tokens // 8)
        self.official, self.gap = opts.rules == "official", gap_ids(tokenizer)  # the newline after </Parallel>
        force = None if opts.force_block is False else "line" if opts.force_block is True else int(opts.force_block)
        self.prompts, self.G = prompts, group_size
        seeds = opts.seed if isinstance(opts.seed, (list, tuple)) else [
            mix(opts.seed if opts.seed is not None else int(torch.randint(1 << 62, ())), i) for i in range(len(prompts))]
        self.rollouts = [RolloutState(list(p), mix(seeds[i], g), force)  # prompt-major
                         for i, p in enumerate(prompts) for g in range(group_size)]
        self.pending = list(range(len(self.rollouts)))  # rollouts not yet admitted, in order
        self.per_rollout = opts.num_paths if opts.parallel else 1  # rows each admitted rollout holds
        self.rows_held = 0  # by the admitted rollouts
        self.rows = []      # RowState (or None: a free row) per cache row
        self.logits = None  # (len(rows), V) the logits each row samples its next token from
        self.ready = []     # rollouts whose paths have all finished: merge them next step

    def _alloc(self, n):  # n free row slots (free rows reused, the rest added)
        free = [i for i, row in enumerate(self.rows) if row is None][:n]
        extra = n - len(free)
        if extra:
            free += list(range(len(self.rows), len(self.rows) + extra))
            self.rows += [None] * extra
            self.kv.add_rows(extra)
            if self.logits is not None:
                self.logits = torch.cat([self.logits, self.logits.new_zeros(extra, self.logits.shape[1])])
        assert len(self.rows) <= self.opts.max_rows
        return free

    # 1) admit: prefill the prompts of the next rollouts while rows are free
    def admit(self):
        k = min(len(self.pending), (self.opts.max_rows - self.rows_held) // self.per_rollout)
        if k <= 0:
            return
        new, self.pending = self.pending[:k], self.pending[k:]
        self.rows_held += k * self.per_rollout
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
            rollout = self.rollouts[r]
            self.rows[j] = RowState(rollout, None, rollout.out, len(rollout.prompt))
        self.logits[torch.tensor(slots)] = logits[torch.tensor([which[r // self.G] for r in new])]

    # 2) fork: clone the KV cache of the prefix into one row per path
    def fork(self):
        N, o = self.opts.num_paths, self.opts
        for i, row in [(i, row) for i, row in enumerate(self.rows) if row is not None and row.fork]:
            r, room = row.rollout, o.max_new_tokens - len(row.rollout.out.ids)
            # official: `cap` tokens between the tags (ids[:max_len], then </Path>); reserve: a share of what
            # is left after </Parallel>, the newline, <Summary>, </Summary> and the reserve
            cap, left = o.path_max_tokens, room - 3 - len(self.gap) - self.reserve
            budget = (cap or OFFICIAL_PATH_TOKENS) + 2 if self.official else min(cap or left, left // N)
            b = r.block = BlockState(len(r.out.ids) - 1, row.pos - 1, budget, room, int(self.kv.valid[i].sum()),
                                     [Segment() for _ in range(N)])
            for k, j in enumerate([i] + self._alloc(N - 1)):
                if j != i:
                    self.kv.copy_row(i, j)
                self.rows[j] = RowState(r, k, b.paths[k], b.p + 1, [self.tags[PATH]])

    # 3) merge: each rollout whose paths have all finished continues in its first path's row
    def merge(self):
        if not self.ready:
            return
        ready, self.ready, unseen = self.ready, [], self.opts.variant == "unseen"
        where = {(row.rollout, row.path): i for i, row in enumerate(self.rows) if row is not None and row.parked}
        path_rows = [[where[(r, k)] for k in range(len(r.block.paths))] for r in ready]
        # official rules: a block the response cannot hold is cut at the budget, and the rollout ends there
        cut = [sum(len(seg.ids) for seg in r.block.paths) >= r.block.room for r in ready]
        whole = [(r, rows) for r, rows, c in zip(ready, path_rows, cut) if not c]
        if unseen:  # paths 2..N's own entries appended after path 1's (prefix + path 1)
            for r, rows in whole:
                self.kv.merge(rows[0], rows[1:], r.block.n_prefix)
        elif whole:  # re-encode paths 2..N after path 1, sequential positions
            later = [sum((seg.ids for seg in r.block.paths[1:]), []) for r, _ in whole]
            start = [r.block.p + len(r.block.paths[0].ids) + 1 for r, _ in whole]
            Q = max(len(x) for x in later)
            if Q:  # (n, Q) right-padded
                ids, pos = torch.tensor([x + [self.pad] * (Q - len(x)) for x in later]), torch.tensor(start)[:, None]
                q_valid = torch.arange(Q)[None] < torch.tensor([len(x) for x in later])[:, None]
                self.kv.extend(self.model, ids, pos + torch.arange(Q)[None], q_valid, [rows[0] for _, rows in whole])
        for r, rows, c in zip(ready, path_rows, cut):  # the paths into the response, in canonical layout
            for j in rows[1:]:
                self.rows[j] = None
                self.kv.free(j)
            b, nxt, spans = r.block, r.block.p + 1, []
            for seg in b.paths:
                ids, forced, logprobs, positions, allowed = seg.columns()
                positions = positions if unseen else range(nxt, nxt + len(ids))
                spans.append((len(r.out.ids), len(r.out.ids) + len(ids)))
                fit = self.opts.max_new_tokens - len(r.out.ids)  # official: the response is cut at the budget
                for column in list(zip(ids, forced, logprobs, positions, allowed))[:fit]:
                    r.out.add(*column)
                nxt += len(ids)
            if c:  # cut wherever the budget falls (official: response_ids[:response_length])
                self._finish(rows[0], "budget")
                continue
            b.spans, b.summary = spans, len(r.out.ids) + 1 + len(self.gap)
            pos = b.p + 1 + max(len(seg.ids) for seg in b.paths) if unseen else nxt  # of </Parallel>
            queue = [self.tags[PARALLEL_END], *self.gap, self.tags[SUMMARY]]  # the official layout, all forced
            self.rows[rows[0]] = RowState(r, None, r.out, pos, queue)
            r.phase = Phase.SUMMARY

    # 4) choose: the forced tokens that are due, the tag mask, then sample
    def can_open(self, r):
        """May a block open now? Under the block limit, and (reserve) if each path keeps 3 tokens."""
        left = self.opts.max_new_tokens - len(r.out.ids) - 1 - 3 - len(self.gap) - self.reserve
        return len(r.blocks) < self.opts.max_blocks and (self.official or left // self.opts.num_paths >= 3)

    def tag_mask(self, row):
        """The tags a row may sample (a bitmask over format.TAGS)."""
        if row.path is not None:
            return BIT[PATH_END]
        if row.rollout.phase == Phase.SUMMARY:
            return BIT[SUMMARY_END]
        return BIT[PARALLEL] if self.can_open(row.rollout) else 0

    def queue_due(self, row):
        """Queue the forced token that is due now: a budget's closing tag, or a forced block."""
        r = row.rollout
        if row.queue:
            return
        if row.path is not None:
            if len(row.seg.ids) >= r.block.budget - 1:
                row.queue.append(self.tags[PATH_END])
        elif r.phase == Phase.SUMMARY:  # (official: a summary runs until it closes or the budget cuts it)
            if not self.official and len(r.out.ids) >= self.opts.max_new_tokens - 1 - self.reserve // 2:
                row.queue.append(self.tags[SUMMARY_END])
        elif r.force is not None and not r.blocks and self.can_open(r):  # a forced block: due now?
            n, line = len(r.out.ids), "\n" in self.tok.decode(r.out.ids[-1:])
            if (n >= 32 or line) if r.force == "line" else n >= r.force:
                row.queue.append(self.tags[PARALLEL])
                r.force = None

    def choose(self):
        bits, logits = [ALL_TAGS] * len(self.rows), self.logits  # parallel=False: tags are ordinary tokens
        if self.opts.parallel:
            for i, row in enumerate(self.rows):
                if row is not None and not row.parked:
                    self.queue_due(row)
                    bits[i] = self.tag_mask(row)
            logits = apply_tag_mask(logits, torch.tensor(bits, device=self.device), self.tags)
        logp = torch.log_softmax(logits / (self.opts.temperature or 1), -1)  # (R, V); greedy: temperature 1
        keys = [row.noise_key() if row is not None and not row.parked else 0 for row in self.rows]
        tok = draw(logp, self.opts.temperature, self.opts.top_p, torch.tensor(keys, device=self.device))  # (R,)
        out = torch.stack([tok.to(logp.dtype), logp.gather(1, tok[:, None])[:, 0]]).tolist()  # one host sync
        return [int(t) for t in out[0]], out[1], bits

    # 5) record each row's token and advance its phase; returns the token each row feeds (None: none)
    def record(self, toks, logps, bits):
        fed = [None] * len(self.rows)
        for i, row in enumerate(self.rows):
            if row is None or row.parked:
                continue
            r, forced = row.rollout, bool(row.queue)
            tok, lp = (row.queue.pop(0), 0.0) if forced else (toks[i], logps[i])
            if not forced and tok in self.eos and self.opts.parallel:
                if row.path is not None or r.phase == Phase.SUMMARY:  # EOS ends a path or a summary
                    tok, forced = self.tags[PATH_END] if row.path is not None else self.tags[SUMMARY_END], True
                elif r.force is not None and bits[i]:  # a forced block is still due: open it instead of stopping
                    tok, forced, r.force = self.tags[PARALLEL], True, None
            row.seg.add(tok, forced, lp, row.pos, bits[i])
            row.pos += 1
            stop = "eos" if row.path is None and tok in self.eos and not forced else None  # the end, not fed
            fed[i] = tok
            if self.opts.parallel:
                if row.path is not None:  # it ends at </Path>, or where nothing more of it fits in the response
                    room = r.block.room - sum(len(seg.ids) for seg in r.block.paths[:row.path])
                    row.closing = tok == self.tags[PATH_END] or len(row.seg.ids) >= room
                elif r.phase == Phase.MAIN and tok == self.tags[PARALLEL]:
                    row.fork, r.phase = True, Phase.PATHS
                elif r.phase == Phase.SUMMARY and tok == self.tags[SUMMARY_END]:
                    r.blocks.append(BlockSpan(r.block.parallel, r.block.spans, (r.block.summary, len(r.out.ids))))
                    r.phase, r.block = Phase.MAIN, None
                    # official: the rollout ends with its max_blocks-th block
                    stop = "max_blocks" if self.official and len(r.blocks) >= self.opts.max_blocks else None
            if row.path is None and (stop or len(r.out.ids) >= self.opts.max_new_tokens):
                self._finish(i, stop or "budget")
                fed[i] = None
        return fed

    def _finish(self, i, reason):
        self.rows[i].rollout.stop = reason
        self.rows[i] = None
        self.kv.free(i)
        self.rows_held -= self.per_rollout
        self.bar.update(1)

    # 6) decode: one forward of every row (rows with nothing to feed get an invalid column)
    def decode(self, fed):
        ids = torch.tensor([[t if t is not None else self.pad] for t in fed])  # (R, 1) on the host: the
        pos = torch.tensor([[row.pos - 1 if t is not None else 0] for t, row in zip(fed, self.rows)])  # cache moves them
        live = torch.tensor([[t is not None] for t in fed])
        self.logits = self.kv.step(self.model, ids, pos, live)  # (R, V)
        for row in self.rows:
            if row is not None and row.closing:  # a finished path: park its row until its siblings finish
                row.closing, row.parked = False, True
                row.rollout.block.done += 1
                if row.rollout.block.done == len(row.rollout.block.paths):
                    self.ready.append(row.rollout)

    # 7) compact: drop free rows once the cache says it pays
    def compact(self):
        keep = [i for i, row in enumerate(self.rows) if row is not None]
        if self.kv.compact_due(len(keep)):
            self.kv.compact(keep)
            self.rows, self.logits = [self.rows[i] for i in keep], self.logits[keep]

    def finished(self, r):
        """The Rollout of a finished rollout state (its structure read back from its tag tokens)."""
        rollout = make_rollout(self.tok, r.prompt, r.out.ids, r.stop, *r.out.columns()[1:])
        if self.opts.parallel:  # its tag tokens give back its blocks (official: maybe then one the budget cut)
            assert [b for b in find_blocks(r.out.ids, self.tags, cut=True) if not b.cut] == r.blocks and (
                rollout.format_error is None or self.official and r.stop == "budget"), "sampler bug"
        return rollout


@torch.inference_mode()
def sample(model, tokenizer, prompts, group_size=1, *, cache=None, progress=False, **options):
    """Rollouts of prompts (lists of token ids), `group_size` per prompt, prompt-major. options: Options's
    fields; cache: a kvcache.KVCache (a run keeps one for all its calls), else one is made for the call."""
    opts = Options(**options)
    prompts = [list(p) for p in prompts]
    check_request(model, prompts, opts)
    kv, max_rows = kvcache.for_call(model, opts, prompts, group_size, cache)
    opts = Options(**{**opts.__dict__, "max_rows": max_rows})
    bar = tqdm(total=len(prompts) * group_size, desc="rollouts", disable=not progress)
    run = _Sampler(model, tokenizer, prompts, group_size, opts, kv, bar)
    while run.pending or any(row is not None for row in run.rows):
        run.admit()                                        # 1) admit new rollouts: prefill their prompts
        run.fork()                                         # 2) fork: clone the KV cache into the path rows
        run.merge()                                        # 3) merge finished paths into the first path's row
        toks, logps, bits = run.choose()                   # 4) choose: forced tokens, tag mask, sample
        fed = run.record(toks, logps, bits)                # 5) record tokens, advance phases
        if any(t is not None for t in fed):
            run.decode(fed)                                # 6) decode: one forward of all live rows
        run.compact()                                      # 7) compact the cache now and then
    bar.close()
    return [run.finished(r) for r in run.rollouts]
