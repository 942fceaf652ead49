"""
The fast KV cache (`sample(fast=True)`, or a StaticRows passed as `cache=`):
preallocated rows, per-row write positions, the decode step as CUDA graphs.

R rows of S columns per layer are allocated once, sized by a memory budget
(`rows_for_budget`), and kept for a whole run: train_rl.py makes one and hands
it to every sample() call. Each row appends at its own write position
(`length`), so a decode step writes one column per row in place and attends to
the first `view` columns only, `view` being the longest row rounded up to a
multiple of 256. The shapes of a decode step then depend on (rows bucket, view)
alone, so on CUDA each such step is captured once as a CUDA graph and replayed:
one launch instead of a few hundred small kernels per token, the overhead that
dominates eager decoding of a 36-layer model. Rows are padded up to a bucket
(1, 8, 32, 64, 128, 256, ...) with dead rows, which write to a scratch column
(the last one) that no query ever attends to; compaction moves the live rows
down to a smaller bucket.

Graphs are captured for one model object and replayed while its weights change
in place (train_rl.py refreshes its bf16 sampling copy with copy_). They are
used without autocast only (the model itself in bf16): the autocast weight cache
cannot be captured safely, so under autocast the step runs eagerly. Only the
model forward is captured; sampling runs eagerly on the GPU after it.

Simplification: every row gets the worst case S = longest prompt +
max_new_tokens + 1 columns (no paging), so the budget buys R = budget / (S x KV
bytes per token) rows.
"""

import warnings

import torch

from nanopr1.kvcache import run_model

BUCKETS = (1, 8, 32, 64, 128, 256)  # rows per captured decode step; beyond: multiples of 256
VIEW = 256  # the columns a step attends to are rounded up to a multiple of this


def bucket(n):
    return next((b for b in BUCKETS if b >= n), -(-n // 256) * 256)


def kv_bytes_per_token(config, dtype):
    """K and V of every layer for one token of one row."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8


def rows_for_budget(config, dtype, max_cols, budget_bytes):
    """How many rows of `max_cols` columns (plus the scratch column) fit in `budget_bytes`."""
    return int(budget_bytes // ((max_cols + 1) * kv_bytes_per_token(config, dtype)))


class StaticRows:
    """kv tensors (R, H, S + 1, D), the last column a scratch column for dead rows; length[r] (host) =
    where row r writes next; valid (R, S + 1)."""

    # the decode step: "cuda" = captured as CUDA graphs on a GPU (no autocast), eager elsewhere; "never";
    # "always" = the bucketed step with static buffers on any device (on a CPU it is re-run, not replayed: tests).
    # The default of new caches; a cache whose capture fails decodes eagerly from then on (graph_error says why).
    graphs = "cuda"

    def __init__(self, max_rows, max_cols, device):
        self.R, self.S = max_rows, max_cols + 1
        self.valid = torch.zeros(self.R, self.S, dtype=torch.bool, device=device)
        self.kv = []  # allocated by the first forward, with the model's dtype and heads
        self.length = [0] * self.R
        self.n = 0  # rows in use by the sampler (rows 0..n-1)
        self.feed = None  # (rows, cols, view, prefix) of the forward in progress
        self.captured, self.pool, self.model = {}, None, None  # (bucket, view) -> (replay, input buffer, logits)
        self.graphs, self.graph_error = StaticRows.graphs, None

    def reset(self, model):
        """Start a sample() call: no rows in use; graphs are kept if the model is the same object."""
        if model is not self.model:
            self.captured, self.model = {}, model
        self.valid.zero_()
        self.length, self.n = [0] * self.R, 0

    def forward(self, model, ids, pos, q_valid, rows):
        """Feed (n, Q) tokens of rows `rows`; each row writes its valid tokens at its own next columns, its
        padding tokens at the scratch column. Logits of each row's last query (n, V)."""
        rows = list(rows)
        cols, view = self._columns(rows, q_valid.cpu())
        dev = self.valid.device
        return self._forward(model, ids.to(dev), pos.to(dev), torch.as_tensor(rows, device=dev), cols.to(dev),
                             q_valid.to(dev), view, prefix=rows == list(range(len(rows))))

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
        return run_model(model, self, input_ids=ids, position_ids=pos, attention_mask=mask[:, None])

    def write_layer(self, layer, k, v):
        """Called by each attention layer: store k, v (n, H, Q, D) at the fed columns; return (n, H, view, D)."""
        if len(self.kv) <= 2 * layer:  # first write: allocate with the model's dtype and heads
            self.kv += [x.new_zeros(self.R, x.shape[1], self.S, x.shape[3]) for x in (k, v)]
        rows, cols, view, prefix = self.feed
        out = []
        for t, x in zip(self.kv[2 * layer:2 * layer + 2], (k, v)):
            t.transpose(1, 2)[rows[:, None], cols] = x.transpose(1, 2)  # (n, Q, H, D) at each row's own columns
            out.append(t[:len(rows), :, :view] if prefix else t[rows, :, :view])
        return out

    # -- the decode step as CUDA graphs

    def step(self, model, ids, pos, fed):
        if not (self.graphs == "always" or self.graphs == "cuda" and self.valid.is_cuda
                and not torch.is_autocast_enabled("cuda")):
            return self.forward(model, ids, pos, fed, range(self.n))
        n = self.n
        Rb = min(bucket(n), self.R)  # rows n..Rb-1 are free: dead padding rows
        cols, view = self._columns(range(n), fed.cpu())
        inp = torch.zeros(4, Rb, dtype=torch.long)  # ids, positions, columns, valid: one copy to the GPU
        inp[2] = self.S - 1
        inp[0, :n], inp[1, :n], inp[2, :n], inp[3, :n] = ids[:, 0].cpu(), pos[:, 0].cpu(), cols[:, 0], fed[:, 0].cpu()
        try:
            replay, buf, logits = self._graph(model, Rb, view)
        except RuntimeError as e:  # e.g. an op that waits for the host inside the model: decode eagerly
            warnings.warn(f"CUDA graph capture failed, the static cache decodes eagerly: {e}")
            self.graphs, self.graph_error = "never", str(e)
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

    # -- the other operations of the sampler (see kvcache.py)

    def prefill(self, model, ids, pos, q_valid, slots):
        return self.forward(model, ids, pos, q_valid, slots)

    def extend(self, model, ids, pos, q_valid, rows):
        self.forward(model, ids, pos, q_valid, rows)

    def add_rows(self, n):
        if self.n + n > self.R:
            raise RuntimeError(f"static KV cache has {self.R} rows, {self.n + n} needed")
        self.n += n

    def free(self, i):
        self.valid[i] = False
        self.length[i] = 0

    def copy_row(self, src, dst):
        L = self.length[src]
        for t in self.kv:
            t[dst, :, :L] = t[src, :, :L]
        self.valid[dst] = self.valid[src]
        self.length[dst] = L

    def merge(self, dst, srcs, start):
        """Append the valid entries of rows srcs after their first `start` to row dst, at its write position."""
        for src in srcs:
            cols = self.valid[src, :self.S - 1].nonzero()[start:, 0]
            L, m = self.length[dst], len(cols)
            if L + m > self.S - 1:
                raise RuntimeError(f"static KV cache row full ({self.S - 1} columns)")
            for t in self.kv:
                t[dst, :, L:L + m] = t[src][:, cols]
            self.valid[dst, L:L + m] = True
            self.length[dst] = L + m

    def compact_due(self, n_live):
        return bucket(n_live) < bucket(self.n)  # a smaller bucket of rows would do

    def compact(self, keep):
        """Move the rows `keep` (ascending) down to rows 0..len(keep)-1."""
        n, idx = len(keep), torch.as_tensor(keep, dtype=torch.long, device=self.valid.device)
        L = max([self.length[r] for r in keep], default=0)
        for t in self.kv:
            t[:n, :, :L] = t[idx, :, :L]
        self.valid[:n], self.valid[n:] = self.valid[idx], False
        self.length, self.n = [self.length[r] for r in keep] + [0] * (self.R - n), n
