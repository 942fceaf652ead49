"""
The branching sampler: every RL rollout and every evaluation goes through here (docs/design.md,
"Sampling"). Each token of a rollout, what it changes, and where (methods of _Sampler):

    token fed             what changes                                            where
    <Parallel> (main)     the row forks: N path rows share its KV cache           record -> fork
    </Path>   (a path)    the path row parks (fed, then kept) until its siblings  record
    last </Path>          path 1's row takes over: </Parallel> nl <Summary> forced  merge
    </Summary>            the block is counted; back to the main text             record
    EOS (main text)       the rollout ends, its rows free up for new rollouts     record -> admit

What a call takes (Options, its budget `rules`), checks (check_request), holds for each rollout while it
is written (RolloutState) and returns (Rollout): rollout.py. Its random draws: mix, gumbel, draw, below.
"""

from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from nanopr1 import kvcache
from nanopr1.format import (PARALLEL, PARALLEL_END, PATH, PATH_END, SUMMARY, SUMMARY_END, end_of_turn_id, gap_ids,
                            tag_ids)
from nanopr1.rollout import (ALL_TAGS, BIT, OFFICIAL_PATH_TOKENS, BlockState, Options, RolloutState, Segment,
                             apply_tag_mask, check_request, make_rollout)


@dataclass(eq=False)
class RowState:  # one cache row: the main line of a rollout (path None) or one of its paths
    rollout: RolloutState                       # the rollout it writes
    path: object                                # None or the path index
    seg: Segment                                # where its tokens go: rollout.out, or its path's segment
    pos: int                                    # position id of the next token fed
    queue: list = field(default_factory=list)   # forced tokens to insert next
    fork: bool = False                          # <Parallel> was just fed: fork before the next token
    parked: bool = False                        # a finished path: fed no more, kept for the merge

    def noise_key(self):
        """The key of the row's next draw, new at each draw: the main line's index, or a path's place."""
        r = self.rollout
        if self.path is None:
            return mix(r.key, len(r.out.ids))
        return mix(r.key, r.n_blocks, self.path, len(self.seg.ids), -1)


# the sampler
class _Sampler:
    def __init__(self, model, tokenizer, prompts, group_size, opts, cache, bar):
        self.model, self.tok, self.opts, self.cache, self.bar = model, tokenizer, opts, cache, bar
        self.tags, self.gap = tag_ids(tokenizer), gap_ids(tokenizer)  # gap: the newline after </Parallel>
        # the main text ends at any of the model's EOS ids, the tokenizer's, or the chat turn's end
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos = {e for e in eos + [tokenizer.eos_token_id, end_of_turn_id(tokenizer)] if e is not None}
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos, default=0)
        self.reserve = opts.reserve if opts.reserve is not None else min(64, opts.max_new_tokens // 8)
        self.official = opts.rules == "official"
        force = None if opts.force_block is False else "line" if opts.force_block is True else int(opts.force_block)
        # a seed per prompt, then one per rollout of its group: each rollout's own random stream
        seed = opts.seed if opts.seed is not None else int(torch.randint(1 << 62, ()))
        seeds = seed if isinstance(seed, (list, tuple)) else [mix(seed, i) for i in range(len(prompts))]
        self.prompts, self.G = prompts, group_size
        self.rollouts = [RolloutState(list(p), mix(seeds[i], g), force)  # prompt-major
                         for i, p in enumerate(prompts) for g in range(group_size)]
        self.pending = list(range(len(self.rollouts)))  # rollouts not yet admitted, in order
        self.per_rollout = opts.num_paths if opts.parallel else 1  # rows each admitted rollout holds
        self.rows_held = 0  # by the admitted rollouts
        self.rows = []      # RowState (or None: a free row) per cache row
        self.logits = None  # (len(rows), V) the logits each row samples its next token from
        self.ready = []     # rollouts whose paths have all finished: merge them next step

    def _alloc(self, n):  # n free row slots: free rows reused, the rest added to the cache
        free = [i for i, row in enumerate(self.rows) if row is None][:n]
        extra = n - len(free)
        if extra:
            free += list(range(len(self.rows), len(self.rows) + extra))
            self.rows += [None] * extra
            self.cache.add_rows(extra)
            if self.logits is not None:
                self.logits = torch.cat([self.logits, self.logits.new_zeros(extra, self.logits.shape[1])])
        return free

    # 1) admit: prefill the prompts of the next rollouts while rows are free
    def admit(self):
        k = min(len(self.pending), (self.opts.max_rows - self.rows_held) // self.per_rollout)
        if k <= 0:
            return
        new, self.pending = self.pending[:k], self.pending[k:]
        self.rows_held += k * self.per_rollout
        slots = self._alloc(k)
        # a prompt is prefilled once, in the row of its first new rollout; its other rollouts copy that row
        first = {}  # prompt index -> that slot
        for slot, idx in zip(slots, new):
            first.setdefault(idx // self.G, slot)
        prompts = [self.prompts[i] for i in first]
        P = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad] * (P - len(p)) + p for p in prompts])  # (n, P) left-padded
        pos = torch.tensor([[0] * (P - len(p)) + list(range(len(p))) for p in prompts])
        real = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts])
        logits = self.cache.prefill(self.model, ids, pos, real, list(first.values()))  # (n, V)
        if self.logits is None:
            self.logits = logits.new_zeros(len(self.rows), logits.shape[1])
        self.logits[list(first.values())] = logits
        for slot, idx in zip(slots, new):
            src = first[idx // self.G]
            if slot != src:
                self.cache.copy_row(src, slot)
                self.logits[slot] = self.logits[src]
            r = self.rollouts[idx]
            self.rows[slot] = RowState(r, None, r.out, len(r.prompt))

    # 2) fork: clone the KV cache of the prefix into one row per path
    def fork(self):
        N, o = self.opts.num_paths, self.opts
        for i, row in [(i, row) for i, row in enumerate(self.rows) if row is not None and row.fork]:
            r, room = row.rollout, o.max_new_tokens - len(row.rollout.out.ids)
            # a path's budget. official: `cap` tokens between the tags (ids[:max_len], then </Path>); reserve:
            # a share of what is left after </Parallel>, the newline, <Summary>, </Summary> and the reserve
            cap, left = o.path_max_tokens, room - 3 - len(self.gap) - self.reserve
            budget = (cap or OFFICIAL_PATH_TOKENS) + 2 if self.official else min(cap or left, left // N)
            n_prefix = int(self.cache.valid[i].sum())
            b = r.block = BlockState(p=row.pos - 1, budget=budget, room=room, n_prefix=n_prefix,
                                     paths=[Segment() for _ in range(N)])
            # path 1 keeps the row; each other path gets a copy of it. Every path opens with a forced <Path>
            for k, j in enumerate([i] + self._alloc(N - 1)):
                if j != i:
                    self.cache.copy_row(i, j)
                self.rows[j] = RowState(r, k, b.paths[k], b.p + 1, queue=[self.tags[PATH]])

    # 3) merge: each rollout whose paths have all finished continues in its first path's row
    def merge(self):
        ready, self.ready, unseen = self.ready, [], self.opts.variant == "unseen"
        where = {(row.rollout, row.path): i for i, row in enumerate(self.rows) if row is not None and row.parked}
        path_rows = [[where[(r, k)] for k in range(len(r.block.paths))] for r in ready]
        # official rules: a block the response cannot hold is cut at the budget, and the rollout ends there
        cut = [sum(len(seg.ids) for seg in r.block.paths) >= r.block.room for r in ready]
        whole = [(r, rows) for r, rows, c in zip(ready, path_rows, cut) if not c]
        if unseen:
            # Unseen: paths 2..N's cache entries go after path 1's; their keys already hold their positions (RoPE)
            for r, rows in whole:
                self.cache.merge(rows[0], rows[1:], r.block.n_prefix)
        elif whole:
            # Seen: paths 2..N are re-encoded after path 1 in one forward, at sequential positions
            later = [sum((seg.ids for seg in r.block.paths[1:]), []) for r, _ in whole]
            start = [r.block.p + len(r.block.paths[0].ids) + 1 for r, _ in whole]
            Q = max(len(x) for x in later)
            if Q:  # (n, Q) right-padded
                ids = torch.tensor([x + [self.pad] * (Q - len(x)) for x in later])
                pos = torch.tensor(start)[:, None] + torch.arange(Q)[None]
                real = torch.arange(Q)[None] < torch.tensor([len(x) for x in later])[:, None]
                self.cache.extend(self.model, ids, pos, real, [rows[0] for _, rows in whole])
        for r, rows, c in zip(ready, path_rows, cut):
            for j in rows[1:]:
                self.rows[j] = None
                self.cache.free(j)
            # the paths into the response, in turn (canonical layout); official: the response is cut at the budget
            b, nxt = r.block, r.block.p + 1
            for seg in b.paths:
                if not unseen:
                    seg.positions[:] = range(nxt, nxt + len(seg.ids))
                fit = self.opts.max_new_tokens - len(r.out.ids)
                for column in list(zip(*seg.columns()))[:fit]:
                    r.out.add(*column)
                nxt += len(seg.ids)
            if c:  # cut wherever the budget falls (official: response_ids[:response_length])
                self._finish(rows[0], "budget")
                continue
            # path 1's row goes on as the main line: </Parallel>, the newline and <Summary> forced (the
            # official layout); </Parallel> sits one past the longest path (Unseen) or after them all (Seen)
            pos = b.p + 1 + max(len(seg.ids) for seg in b.paths) if unseen else nxt
            queue = [self.tags[PARALLEL_END], *self.gap, self.tags[SUMMARY]]
            self.rows[rows[0]] = RowState(r, None, r.out, pos, queue=queue)
            r.phase = "summary"

    # 4) choose: the forced tokens that are due, the tag mask, then sample
    def can_open(self, r):
        """May a block open now? Under the block limit, and (reserve) if each path keeps 3 tokens."""
        left = self.opts.max_new_tokens - len(r.out.ids) - 1 - 3 - len(self.gap) - self.reserve
        return r.n_blocks < self.opts.max_blocks and (self.official or left // self.opts.num_paths >= 3)

    def allowed(self, row):
        """The tags a row may sample now (a bitmask over format.TAGS)."""
        if row.path is not None:
            return BIT[PATH_END]
        if row.rollout.phase == "summary":
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
        # a summary closes before the budget (official: it runs until it closes or the budget cuts it)
        elif r.phase == "summary":
            if not self.official and len(r.out.ids) >= self.opts.max_new_tokens - 1 - self.reserve // 2:
                row.queue.append(self.tags[SUMMARY_END])
        # a forced block opens at the end of the first line (at most 32 tokens in) or after n tokens
        elif r.force is not None and not r.n_blocks and self.can_open(r):
            n, line = len(r.out.ids), "\n" in self.tok.decode(r.out.ids[-1:])
            if (n >= 32 or line) if r.force == "line" else n >= r.force:
                row.queue.append(self.tags[PARALLEL])
                r.force = None

    def choose(self):
        # with parallel=False the tags are ordinary tokens: every tag allowed
        allowed, logits = [ALL_TAGS] * len(self.rows), self.logits
        if self.opts.parallel:
            for i, row in enumerate(self.rows):
                if row is not None and not row.parked:
                    self.queue_due(row)
                    allowed[i] = self.allowed(row)
            logits = apply_tag_mask(logits, torch.tensor(allowed, device=logits.device), self.tags)
        # greedy (temperature 0) takes the argmax of the log-probs at temperature 1
        logp = torch.log_softmax(logits / (self.opts.temperature or 1), -1)  # (R, V)
        keys = [row.noise_key() if row is not None and not row.parked else 0 for row in self.rows]
        tok = draw(logp, self.opts.temperature, self.opts.top_p, torch.tensor(keys, device=logp.device))  # (R,)
        # the tokens and their log-probs come back to the host in one sync
        out = torch.stack([tok.to(logp.dtype), logp.gather(1, tok[:, None])[:, 0]]).tolist()
        return [int(t) for t in out[0]], out[1], allowed

    # 5) record each row's token and advance its phase; returns the token each row feeds (None: none)
    def record(self, toks, logps, allowed):
        feed = [None] * len(self.rows)
        for i, row in enumerate(self.rows):
            if row is None or row.parked:
                continue
            r, forced = row.rollout, bool(row.queue)
            tok, lp = (row.queue.pop(0), 0.0) if forced else (toks[i], logps[i])
            # EOS inside a block closes its path or summary; while a forced block is due, EOS opens it instead
            if not forced and tok in self.eos and self.opts.parallel:
                if row.path is not None or r.phase == "summary":
                    tok, forced = self.tags[PATH_END] if row.path is not None else self.tags[SUMMARY_END], True
                elif r.force is not None and allowed[i]:
                    tok, forced, r.force = self.tags[PARALLEL], True, None
            row.seg.add(tok, forced, lp, row.pos, allowed[i])
            row.pos += 1
            stop = "eos" if row.path is None and tok in self.eos and not forced else None  # the end, not fed
            if self.opts.parallel:
                # a path ends at </Path> or where no more of it fits: fed this step, then its row parks
                if row.path is not None:
                    room = r.block.room - sum(len(seg.ids) for seg in r.block.paths[:row.path])
                    if tok == self.tags[PATH_END] or len(row.seg.ids) >= room:
                        row.parked, r.block.done = True, r.block.done + 1
                        if r.block.done == len(r.block.paths):
                            self.ready.append(r)
                elif r.phase == "main" and tok == self.tags[PARALLEL]:
                    row.fork, r.phase = True, "paths"
                elif r.phase == "summary" and tok == self.tags[SUMMARY_END]:
                    r.phase, r.block, r.n_blocks = "main", None, r.n_blocks + 1
                    # official: the rollout ends with its max_blocks-th block
                    stop = "max_blocks" if self.official and r.n_blocks >= self.opts.max_blocks else None
            if row.path is None and (stop or len(r.out.ids) >= self.opts.max_new_tokens):
                self._finish(i, stop or "budget")
            else:
                feed[i] = tok
        return feed

    def _finish(self, i, reason):
        self.rows[i].rollout.stop = reason
        self.rows[i] = None
        self.cache.free(i)
        self.rows_held -= self.per_rollout
        self.bar.update(1)

    # 6) decode: one forward of every row; a row with nothing to feed gets a column that is not real
    def decode(self, feed):
        # (R, 1) built on the host: the cache moves them to the device
        ids = torch.tensor([[t if t is not None else self.pad] for t in feed])
        pos = torch.tensor([[row.pos - 1 if t is not None else 0] for t, row in zip(feed, self.rows)])
        real = torch.tensor([[t is not None] for t in feed])
        self.logits = self.cache.step(self.model, ids, pos, real)  # (R, V)

    # 7) compact: drop free rows once the cache says it pays
    def compact(self):
        keep = [i for i, row in enumerate(self.rows) if row is not None]
        if self.cache.compact_due(len(keep)):
            self.cache.compact(keep)
            self.rows, self.logits = [self.rows[i] for i in keep], self.logits[keep]


# Sampling noise is a hash of (rollout seed, block, path, token index), not the next number of a shared
# generator: a token's draw does not depend on what shares its batch (other prompts, the row cap, the row it
# lands in, eval's batch size, the number of processes), so the same seeds always give the same rollouts.
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
    # splitmix64's finaliser; `>>` on int64 keeps the sign, so each shift is masked to a logical one
    for k, m in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB), (31, 0)):
        x = x ^ ((x >> k) & ((1 << (64 - k)) - 1))
        x = x * (m - (1 << 64) if m >> 63 else m) if m else x
    # 24 random bits -> a uniform in (0, 1) -> a Gumbel
    u = ((x >> 40) & 0xFFFFFF).float().add_(0.5).div_(1 << 24)
    return -torch.log(-torch.log(u))


def draw(logp, temperature, top_p, keys):
    """A token per row (R,) from log-probs (R, V): the argmax at temperature 0, else top-p Gumbel-max."""
    if temperature == 0:
        return logp.argmax(-1)
    scores = logp
    if top_p < 1.0:
        # keep the smallest set of most likely tokens whose mass reaches top_p
        sorted_p, idx = logp.exp().sort(-1, descending=True)
        cut = (sorted_p.cumsum(-1) - sorted_p) >= top_p  # (R, V) outside the top-p set
        scores = logp.masked_fill(torch.zeros_like(cut).scatter_(-1, idx, cut), float("-inf"))
    return (scores + gumbel(keys, logp.shape[1])).argmax(-1)


@torch.inference_mode()
def sample(model, tokenizer, prompts, group_size=1, *, cache=None, progress=False, **options):
    """Rollouts of prompts (lists of token ids), `group_size` per prompt, prompt-major. options: Options's
    fields; cache: a kvcache.KVCache (a run keeps one for all its calls), else one is made for the call."""
    opts = Options(**options)
    prompts = [list(p) for p in prompts]
    check_request(model, prompts, opts)
    cache, max_rows = kvcache.for_call(model, opts, prompts, group_size, cache)
    opts = Options(**{**opts.__dict__, "max_rows": max_rows})
    bar = tqdm(total=len(prompts) * group_size, desc="rollouts", disable=not progress)
    run = _Sampler(model, tokenizer, prompts, group_size, opts, cache, bar)
    while run.pending or any(row is not None for row in run.rows):
        run.admit()                                        # 1) admit new rollouts: prefill their prompts
        run.fork()                                         # 2) fork: clone the KV cache into the path rows
        run.merge()                                        # 3) merge finished paths into the first path's row
        toks, logps, allowed = run.choose()                # 4) choose: forced tokens, tag mask, sample
        feed = run.record(toks, logps, allowed)            # 5) record tokens, advance phases
        if any(t is not None for t in feed):
            run.decode(feed)                               # 6) decode: one forward of all rows that feed
        run.compact()                                      # 7) compact the cache now and then
    bar.close()
    # each rollout's record; its structure is read back from its tag tokens
    return [make_rollout(tokenizer, r.prompt, r.out.ids, r.stop, *r.out.columns()[1:]) for r in run.rollouts]
