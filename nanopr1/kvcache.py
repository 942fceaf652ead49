"""
The KV caches of the branching sampler: every row being decoded (the main line
of a rollout, or one of its paths) with its own cache entries.

Both caches keep one tensor per layer, K and V of shape (R, H, S, D) for all
rows, plus a (R, S) bool `valid` mask. RoPE is already baked into K and
positions are always passed explicitly, so the order of a row's columns does
not matter, only which are valid: a fork is a row copy, a merge writes a new
row from the entries of its paths, a finished row is freed. The sampler sees
the same operations on both (prefill, forward, grow, free, copy_row, entries,
put, compact_due, compact).

KVRows, the simple path and the reference: the model gets a DynamicCache, so
each forward appends Q columns to every row by concatenation (the shapes change
every step), and now and then the free rows and dead columns are squeezed out.

StaticRows, the fast path (sample(fast=True)): R_max rows and S_max columns
per layer are allocated once. Each row appends at its own write position
(`length`), so a step writes one column per row in place and attends to the
first `view` columns only, `view` being the longest row rounded up to a
multiple of 256. The shapes of a decode step then depend on (rows bucket, view)
alone, so on CUDA each such step is captured once as a CUDA graph and replayed:
one launch instead of a few hundred small kernels per token, the overhead that
dominates eager decoding of a 36-layer model. Rows are padded up to a bucket
(1, 8, 32, 64, 128, 256, ...) with dead rows, which write to a scratch column
that no query ever attends to; compaction moves the live rows to a smaller one.

Simplifications: S_max is the worst case (prompt + max_new_tokens) for every
row and R_max = rollouts x num_paths, so memory is R_max x S_max x (KV bytes
per token) from the start, no paging. Graphs are captured afresh in each
sample() call (two forwards per (bucket, view) met). They are used without
autocast only (a model already in bf16): the autocast weight cache cannot be
captured safely, so under autocast the static step runs eagerly. Only the model
forward is captured; sampling runs eagerly on the GPU after it, with one copy
of the tokens to the host per step.
"""

import warnings

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

BUCKETS = (1, 8, 32, 64, 128, 256)  # rows per captured decode step; beyond: multiples of 256
VIEW = 256  # the columns a step attends to are rounded up to a multiple of this


def bucket(n):
    return next((b for b in BUCKETS if b >= n), -(-n // 256) * 256)


class KVRows:
    """The cache of every row being decoded: kv = [K0, V0, K1, V1, ...], each (R, H, S, D), and valid (R, S)."""

    def __init__(self, kv, valid):
        self.kv, self.valid = kv, valid

    @classmethod
    def prefill(cls, model, ids, pos, q_valid, rep, max_rows=None, max_cols=None):
        """Prefill each prompt once, then one row per rollout (row j is prompt rep[j]); (cache, logits (R, V))."""
        empty = cls([], torch.zeros(len(ids), 0, dtype=torch.bool, device=ids.device))
        logits = empty.forward(model, ids, pos, q_valid)
        rep = torch.as_tensor(rep, device=ids.device)
        return empty.rows(rep), logits[rep]

    def forward(self, model, ids, pos, q_valid, rows=None):
        """Feed (R, Q) tokens at explicit positions, append their Q columns; logits of the last query (R, V).
        With `rows`, only those rows are fed (the others get Q invalid columns)."""
        if rows is not None:
            sub = self.rows(rows)
            logits = sub.forward(model, ids, pos, q_valid)
            self.write(rows, sub)
            return logits
        ids, pos, q_valid = (x.to(self.valid.device) for x in (ids, pos, q_valid))
        R, Q = ids.shape
        new = torch.ones(Q, Q, dtype=torch.bool, device=ids.device).tril() & q_valid[:, None, :]  # (R, Q, Q)
        new |= torch.eye(Q, dtype=torch.bool, device=ids.device)  # a pad query sees itself: no row fully masked
        mask = torch.cat([self.valid[:, None, :].expand(R, Q, -1), new], 2)[:, None]  # (R, 1, Q, S+Q)
        cache = DynamicCache()
        for k, v in zip(self.kv[0::2], self.kv[1::2]):  # wrap [K0, V0, K1, V1, ...] without copying them
            layer = DynamicLayer()
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
            cache.layers.append(layer)
        out = model(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        self.kv = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        self.valid = torch.cat([self.valid, q_valid], 1)
        return out.logits[:, -1].float()

    def rows(self, idx):
        """A new KVRows with rows idx (copies): a fork is rows([i, i, ...])."""
        idx = torch.as_tensor(idx, device=self.valid.device)
        return KVRows([t[idx] for t in self.kv], self.valid[idx])

    def entries(self, i, start=0):
        """The valid entries of row i, in order, from the start-th on: [K0, V0, ...] each (H, n, D)."""
        cols = self.valid[i].nonzero()[start:, 0]
        return [t[i][:, cols] for t in self.kv]

    def put(self, slots, entries):
        """Row slots[j] := the entries entries[j] (a merged row); shorter rows padded with invalid columns."""
        n = torch.tensor([e[0].shape[1] for e in entries])
        kv = [e0.new_zeros(len(entries), e0.shape[0], int(n.max()), e0.shape[2]) for e0 in entries[0]]
        for r, e in enumerate(entries):
            for t, x in zip(kv, e):
                t[r, :, :x.shape[1]] = x
        self.write(slots, KVRows(kv, (torch.arange(int(n.max()))[None] < n[:, None]).to(kv[0].device)))

    def grow(self, rows=0, cols=0):
        """Add free rows and invalid columns (zeros)."""
        self.kv = [F.pad(t, (0, 0, 0, cols, 0, 0, 0, rows)) for t in self.kv]  # (R + rows, H, S + cols, D)
        self.valid = F.pad(self.valid, (0, cols, 0, rows))

    def free(self, i):
        self.valid[i] = False

    def copy_row(self, src, dst):
        for t in self.kv:
            t[dst] = t[src]
        self.valid[dst] = self.valid[src]

    def write(self, slots, other):
        """Write the rows of another KVRows into rows `slots`."""
        S = other.valid.shape[1]
        if S > self.valid.shape[1]:
            self.grow(cols=S - self.valid.shape[1])
        idx = torch.as_tensor(slots, device=self.valid.device)
        for t, o in zip(self.kv, other.kv):
            t[idx, :, :S] = o
        self.valid[idx, :S], self.valid[idx, S:] = other.valid, False

    def compact_due(self, n_live, n_rows):
        """Squeeze once free rows and dead columns are half the cache."""
        return self.valid.numel() > 256 and self.waste() > 0.5

    def compact(self, keep):
        """Keep rows `keep` and squeeze out the columns that are invalid in all of them."""
        valid = self.valid[keep]
        order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices  # valid columns first, in order
        order = order[:, :int(valid.sum(1).max()) if len(keep) else 0]  # (R', S')
        self.kv = [t[keep].gather(2, order[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])) for t in self.kv]
        self.valid = valid.gather(1, order)

    def waste(self):
        return 1.0 - self.valid.sum().item() / max(self.valid.numel(), 1)

# -----------------------------------------------------------------------------
# the fast path: preallocated rows, per-row write positions, CUDA graphs


class _Writer(Cache):
    """The Cache the model sees in a StaticRows forward: each attention layer's `update` writes the new
    K/V at the fed rows' own columns and gets back those rows' first `view` columns."""

    def __init__(self, rows):
        super().__init__(layers=[])
        self.rows = rows

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.rows.write_layer(layer_idx, key_states, value_states)


class StaticRows(KVRows):
    """KVRows with preallocated storage: kv tensors (R_max, H, S_max + 1, D), the last column a scratch
    column for dead rows; length[r] (host) = where row r writes next."""

    # the decode step: "cuda" = captured as CUDA graphs on a GPU (no autocast), eager elsewhere; "never";
    # "always" = the bucketed step with static buffers on any device (on a CPU it is re-run, not replayed: tests)
    graphs = "cuda"
    graph_error = None  # why capturing failed, if it did (the step then runs eagerly)

    def __init__(self, max_rows, max_cols, device):
        super().__init__([], torch.zeros(max_rows, max_cols + 1, dtype=torch.bool, device=device))
        self.R, self.S = max_rows, max_cols + 1
        self.length = [0] * max_rows
        self.n = 0  # rows in use by the sampler (rows 0..n-1)
        self.cache = _Writer(self)
        self.feed = None  # (rows, cols, view, prefix) of the forward in progress
        self.captured, self.pool = {}, None  # (bucket, view) -> (replay, input buffer, logits)

    @classmethod
    def prefill(cls, model, ids, pos, q_valid, rep, max_rows=None, max_cols=None):
        kv = cls(max(max_rows or 0, len(rep), len(ids)), max_cols or ids.shape[1], ids.device)
        logits = kv.forward(model, ids, pos, q_valid)  # prompt i in row i
        R, P = len(rep), ids.shape[1]
        rep = torch.as_tensor(rep, device=ids.device)
        for t in kv.kv:  # row j := row rep[j] (a gather first, so overlapping rows are safe)
            t[:R, :, :P] = t[rep, :, :P]
        kv.valid[:R] = kv.valid[rep]
        kv.length[:R], kv.n = [kv.length[i] for i in rep.tolist()], R
        return kv, logits[rep]

    def forward(self, model, ids, pos, q_valid, rows=None):
        """Feed (n, Q) tokens of rows `rows` (default 0..n-1); each row writes its valid tokens at its own
        next columns, its padding tokens at the scratch column."""
        n, Q = ids.shape
        if rows is None and Q == 1 and (self.graphs == "always" or self.graphs == "cuda" and self.valid.is_cuda
                                        and not torch.is_autocast_enabled("cuda")):
            return self._replay(model, ids, pos, q_valid)
        rows = list(range(n)) if rows is None else list(rows)
        cols, view = self._columns(rows, q_valid.cpu())
        dev = self.valid.device
        return self._forward(model, ids.to(dev), pos.to(dev), torch.as_tensor(rows, device=dev), cols.to(dev),
                             q_valid.to(dev), view, prefix=rows == list(range(n)))

    def _columns(self, rows, q_valid):
        """Where each token is written (n, Q), and how many columns the step attends to; moves the rows on."""
        start = torch.tensor([self.length[r] for r in rows])[:, None]
        cols = torch.where(q_valid, start + q_valid.cumsum(1) - 1, self.S - 1)  # (n, Q) valid tokens in order
        for r, k in zip(rows, q_valid.sum(1).tolist()):
            if self.length[r] + k > self.S - 1:
                raise RuntimeError(f"static KV cache row full ({self.S - 1} columns)")
            self.length[r] += k
        return cols, min(-(-max(self.length[r] for r in rows) // VIEW) * VIEW, self.S - 1)

    def _forward(self, model, ids, pos, rows, cols, q_valid, view, prefix):
        """One forward (eager, or being captured as a graph): write positions, mask, model."""
        self.valid[rows[:, None], cols] = q_valid
        valid = self.valid[:len(rows), :view] if prefix else self.valid[rows, :view]  # (n, view)
        col = torch.arange(view, device=cols.device)
        mask = valid[:, None, :] & (col <= cols[:, :, None])  # (n, Q, view) causal: columns are in order
        mask |= col == cols.clamp(max=view - 1)[:, :, None]  # every query sees itself (pads: column view-1)
        self.feed = (rows, cols, view, prefix)
        out = model(input_ids=ids, position_ids=pos, attention_mask=mask[:, None], past_key_values=self.cache,
                    use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()  # (n, V)

    def write_layer(self, layer, k, v):
        """Called by each attention layer: store k, v (n, H, Q, D) at the fed columns; return (n, H, view, D)."""
        if len(self.kv) <= 2 * layer:  # first write (the prefill): allocate with the model's dtype and heads
            self.kv += [x.new_zeros(self.R, x.shape[1], self.S, x.shape[3]) for x in (k, v)]
        rows, cols, view, prefix = self.feed
        out = []
        for t, x in zip(self.kv[2 * layer:2 * layer + 2], (k, v)):
            t.transpose(1, 2)[rows[:, None], cols] = x.transpose(1, 2)  # (n, Q, H, D) at each row's own columns
            out.append(t[:len(rows), :, :view] if prefix else t[rows, :, :view])
        return out

    # -- the decode step as CUDA graphs

    def _replay(self, model, ids, pos, q_valid):
        n = ids.shape[0]
        Rb = min(bucket(n), self.R)  # rows n..Rb-1 are free: dead padding rows
        cols, view = self._columns(range(n), q_valid.cpu())
        inp = torch.zeros(4, Rb, dtype=torch.long)  # ids, positions, columns, valid: one copy to the GPU
        inp[2] = self.S - 1
        inp[0, :n], inp[1, :n], inp[2, :n], inp[3, :n] = ids[:, 0].cpu(), pos[:, 0].cpu(), cols[:, 0], q_valid[:, 0].cpu()
        try:
            replay, buf, logits = self._graph(model, Rb, view)
        except RuntimeError as e:  # e.g. an op that waits for the host inside the model: decode eagerly
            warnings.warn(f"CUDA graph capture failed, the static cache decodes eagerly: {e}")
            StaticRows.graphs, StaticRows.graph_error = "never", str(e)
            x = inp.to(self.valid.device)
            return self._forward(model, x[0, :, None], x[1, :, None], torch.arange(Rb, device=x.device),
                                 x[2, :, None], x[3, :, None].bool(), view, prefix=True)[:n]
        buf.copy_(inp)
        replay()
        return logits[:n]  # a view of the graph's output: read it before the next step

    def _graph(self, model, Rb, view):
        if (Rb, view) not in self.captured:
            buf = torch.zeros(4, Rb, dtype=torch.long, device=self.valid.device)
            buf[2] = self.S - 1  # the warm-up writes to the scratch column only
            rows = torch.arange(Rb, device=buf.device)
            step = lambda: self._forward(model, buf[0, :, None], buf[1, :, None], rows, buf[2, :, None],
                                         buf[3, :, None].bool(), view, prefix=True)
            if not buf.is_cuda:  # graphs="always" on a CPU: the same buffers, the step re-run at each replay
                logits = step()
                self.captured[(Rb, view)] = (lambda: logits.copy_(step()), buf, logits)
                return self.captured[(Rb, view)]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up outside the graph (lazy initialisations, cuBLAS workspaces)
                step()
            torch.cuda.current_stream().wait_stream(side)
            self.pool = self.pool or torch.cuda.graph_pool_handle()  # one memory pool shared by all buckets
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = step()
            self.captured[(Rb, view)] = (graph.replay, buf, logits)
        return self.captured[(Rb, view)]

    # -- the row operations of the sampler

    def grow(self, rows=0, cols=0):
        self.n += rows
        if self.n > self.R:
            raise RuntimeError(f"static KV cache has {self.R} rows, {self.n} needed")

    def free(self, i):
        self.valid[i] = False
        self.length[i] = 0

    def copy_row(self, src, dst):
        L = self.length[src]
        for t in self.kv:
            t[dst, :, :L] = t[src, :, :L]
        self.valid[dst] = self.valid[src]
        self.length[dst] = L

    def put(self, slots, entries):
        for r, e in zip(slots, entries):
            L = e[0].shape[1]
            for t, x in zip(self.kv, e):
                t[r, :, :L] = x
            self.valid[r, :L], self.valid[r, L:], self.length[r] = True, False, L

    def compact_due(self, n_live, n_rows):
        return bucket(n_live) < bucket(n_rows)  # a smaller bucket of rows would do

    def compact(self, keep):
        """Move the rows `keep` (ascending) down to rows 0..len(keep)-1."""
        n, idx = len(keep), torch.as_tensor(keep, dtype=torch.long, device=self.valid.device)
        L = max([self.length[r] for r in keep], default=0)
        for t in self.kv:
            t[:n, :, :L] = t[idx, :, :L]
        self.valid[:n], self.valid[n:] = self.valid[idx], False
        self.length, self.n = [self.length[r] for r in keep] + [0] * (self.R - n), n
