"""
The KV cache of the branching sampler, the same on a CPU and a GPU (docs/design.md, "One KV cache"):
R rows of S columns per layer, allocated once from a memory budget and kept for a whole run; each row
(a rollout's main line, or one of its paths) appends at its own write position. The decode step pads
the rows to a bucket (1, 8, 32, 64, ...) and attends to a multiple of 256 columns, so its shapes take a
few values and each is captured once as a graph (graphs.py) and replayed: on a GPU; a CPU decodes eagerly
(faster there) unless NANOPR1_CPU_GRAPHS=1 turns the CPU stand-in on, as the tests do. Simplification:
every row holds the worst case, the longest prompt + max_new_tokens (no paging).
"""

import os
import time
import warnings

import torch
from transformers.cache_utils import Cache

from nanopr1 import UsageError, graphs

BUCKETS = (1, 8, 32, 64, 128, 256)  # rows of a captured decode step; beyond: multiples of 256
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


class _Writer(Cache):  # what the model sees: each attention layer's update() hands its K/V to the rows
    def __init__(self, rows):
        super().__init__(layers=[])
        self.rows, self.calls = rows, 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.calls += 1
        return self.rows.write_layer(layer_idx, key_states, value_states)


class KVCache:
    """kv: [K0, V0, K1, V1, ...] each (R, H, S, D), column S-1 the scratch column; valid (R, S) which columns
    hold entries; length[r] (host) where row r writes next; rows 0..n-1 are in use by the sampler."""

    def __init__(self, max_rows, max_cols, device, use_graphs=None):
        self.R, self.cols, self.S = max_rows, max_cols, max_cols + 1  # S: with the scratch column
        self.device = torch.device(device)
        self.valid = torch.zeros(self.R, self.S, dtype=torch.bool, device=device)
        self.kv = []  # allocated by the first forward, with the model's dtype and heads
        self.length, self.n = [0] * self.R, 0
        self.writing = None  # (rows, columns, view, prefix) of the forward in progress, for write_layer
        # what captured steps read: persistent, so a graph never reads a freed tensor
        self.row_ids = torch.arange(self.R, device=device)
        self.step_inputs = torch.zeros(4, self.R, dtype=torch.long, device=device)  # ids, positions, columns, fed
        self.logits = None  # (R, V) fp32, written by every captured step
        if use_graphs is None:  # on a GPU; on a CPU the stand-in only checks the rules, slower than eager
            use_graphs = self.device.type == "cuda" or os.environ.get("NANOPR1_CPU_GRAPHS") == "1"
        self.use_graphs, self.graph_error, self.note = use_graphs, None, ""  # note: the memory plan, for errors
        self.graphs, self.pool, self.model = {}, None, None  # (bucket, view) -> captured step
        self.pool_bytes, self.capture_s = 0, 0.0

    def reset(self, model):  # a sample() call starts: no rows in use; graphs kept for the same model object
        if model is not self.model:
            self.graphs, self.model = {}, model
        self.valid.zero_()
        self.length, self.n = [0] * self.R, 0

    def stats(self):  # for a run's metrics: graphs captured, their memory pool, capture time, a failure
        return {"graphs": len(self.graphs), "graph_pool_gb": self.pool_bytes / 1e9, "capture_s": self.capture_s,
                **({"graph_error": self.graph_error} if self.graph_error else {})}

    # -- a forward through the cache
    def forward(self, model, ids, pos, q_valid, rows):
        """Feed (n, Q) tokens of rows `rows` at their next columns; the last query's logits (n, V) fp32."""
        rows = list(rows)
        cols, view = self._columns(rows, q_valid.cpu())
        dev = self.device
        return self._forward(model, ids.to(dev), pos.to(dev), torch.as_tensor(rows, device=dev), cols.to(dev),
                             q_valid.to(dev), view, prefix=rows == list(range(len(rows))))

    def _columns(self, rows, q_valid):
        """Where each token is written (n, Q), and how many columns the step attends to; moves the rows on."""
        start = torch.tensor([self.length[r] for r in rows])[:, None]
        cols = torch.where(q_valid, start + q_valid.cumsum(1) - 1, self.S - 1)  # (n, Q) valid tokens in order
        for r, k in zip(rows, q_valid.sum(1).tolist()):
            if self.length[r] + k > self.S - 1:
                raise RuntimeError(f"KV cache row full ({self.S - 1} columns)")
            self.length[r] += k
        return cols, min(-(-max(self.length[r] for r in rows) // VIEW) * VIEW, self.S - 1)

    def _forward(self, model, ids, pos, rows, cols, q_valid, view, prefix):
        """One forward (eager, or being captured): mark the columns, build the mask, run the model."""
        self.valid[rows[:, None], cols] = q_valid
        valid = self.valid[:len(rows), :view] if prefix else self.valid[rows, :view]  # (n, view)
        col = torch.arange(view, device=cols.device)
        mask = valid[:, None, :] & (col <= cols[:, :, None])  # (n, Q, view) causal: a row's columns are in order
        mask |= col == cols.clamp(max=view - 1)[:, :, None]  # every query sees itself (pads: column view-1)
        self.writing = (rows, cols, view, prefix)
        writer = _Writer(self)
        out = model(input_ids=ids, position_ids=pos, attention_mask=mask[:, None], cache=writer, use_cache=True,
                    logits_to_keep=1)
        if writer.calls == 0:  # a transformers release that renamed the cache keyword again
            raise RuntimeError("the model ignored the KV cache (passed as `cache=`): see pyproject.toml")
        return out.logits[:, -1].float()

    def write_layer(self, layer, k, v):
        """Called by each attention layer: store k, v (n, H, Q, D) at the fed columns; return (n, H, view, D)."""
        if len(self.kv) <= 2 * layer:  # first write: allocate with the model's dtype and heads
            self.kv += [x.new_zeros(self.R, x.shape[1], self.S, x.shape[3]) for x in (k, v)]
        rows, cols, view, prefix = self.writing
        out = []
        for t, x in zip(self.kv[2 * layer:2 * layer + 2], (k, v)):
            t.transpose(1, 2)[rows[:, None], cols] = x.transpose(1, 2)  # (n, Q, H, D) at each row's own columns
            out.append(t[:len(rows), :, :view] if prefix else t[rows, :, :view])
        return out

    # -- the decode step, captured as a graph per (bucket, view)
    def step(self, model, ids, pos, fed):
        """One token (n, 1) for each row in use; fed (n, 1): which rows have a real token. Logits (n, V)."""
        n = self.n
        if not self.use_graphs or torch.is_autocast_enabled(self.device.type):
            return self.forward(model, ids, pos, fed, range(n))
        Rb = min(bucket(n), self.R)  # rows n..Rb-1 are dead padding rows
        cols, view = self._columns(range(n), fed.cpu())
        inp = torch.zeros(4, Rb, dtype=torch.long)
        inp[2] = self.S - 1
        inp[0, :n], inp[1, :n], inp[2, :n], inp[3, :n] = ids[:, 0].cpu(), pos[:, 0].cpu(), cols[:, 0], fed[:, 0].cpu()
        try:
            graph = self.graphs.get((Rb, view)) or self._capture(model, Rb, view)
        except torch.OutOfMemoryError as e:
            raise torch.OutOfMemoryError(f"out of GPU memory capturing the decode step of {Rb} rows x {view} "
                                         f"columns ({self.R} rows of {self.S} columns in the cache)\n{self.note}\n"
                                         f"lower --kv-memory-gb or --max-rows") from e
        except RuntimeError as e:  # e.g. an op inside the model that waits for the host
            warnings.warn(f"graph capture failed, the KV cache decodes eagerly from now on: {e}")
            self.use_graphs, self.graph_error = False, str(e).splitlines()[0][:200]
            return self._run_step(model, Rb, view, inp.to(self.device))[:n]
        self.step_inputs[:, :Rb].copy_(inp)  # one host-to-device copy
        graph.replay()
        return self.logits[:n]  # a view of the persistent output: read it before the next step

    def _run_step(self, model, Rb, view, inp):  # the decode step of Rb rows from its inputs (4, Rb)
        return self._forward(model, inp[0, :, None], inp[1, :, None], self.row_ids[:Rb], inp[2, :, None],
                             inp[3, :, None].bool(), view, prefix=True)

    def _capture(self, model, Rb, view):
        t0, cuda = time.perf_counter(), self.device.type == "cuda"
        self.step_inputs[:, :Rb] = 0
        self.step_inputs[2, :Rb] = self.S - 1  # the warm-up and the capture write to the scratch column only

        def step():  # reads only persistent tensors: the cache, its buffers, the model's weights
            self.logits[:Rb].copy_(self._run_step(model, Rb, view, self.step_inputs[:, :Rb]))

        if cuda:  # warm up outside the graph (lazy initialisations, cuBLAS workspaces) on a side stream
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                out = self._run_step(model, Rb, view, self.step_inputs[:, :Rb])
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            out = self._run_step(model, Rb, view, self.step_inputs[:, :Rb])
        if self.logits is None:
            self.logits = torch.zeros(self.R, out.shape[1], device=self.device)
        del out
        if cuda:
            self.pool = self.pool or torch.cuda.graph_pool_handle()  # one memory pool shared by every graph
            graph, grown = graphs.capture_cuda(step, self.pool, self.device)
            self.pool_bytes += grown
        else:
            graph = graphs.CpuGraph()
            with graphs.capturing(graph):
                step()
            self.pool_bytes = max(self.pool_bytes, graph.pool_bytes)  # the pool is shared: its size is the peak
        self.graphs[(Rb, view)] = graph
        self.capture_s += time.perf_counter() - t0
        return graph

    # -- the other operations of the sampler
    def prefill(self, model, ids, pos, q_valid, slots):  # prompt i (left-padded) into row slots[i]
        return self.forward(model, ids, pos, q_valid, slots)

    def extend(self, model, ids, pos, q_valid, rows):  # the Seen merge: later paths re-encoded into rows
        self.forward(model, ids, pos, q_valid, rows)

    def add_rows(self, n):
        if self.n + n > self.R:
            raise RuntimeError(f"KV cache has {self.R} rows, {self.n + n} needed")
        self.n += n

    def free(self, i):
        self.valid[i], self.length[i] = False, 0

    def copy_row(self, src, dst):
        L = self.length[src]
        for t in self.kv:
            t[dst, :, :L] = t[src, :, :L]
        self.valid[dst], self.length[dst] = self.valid[src], L

    def merge(self, dst, srcs, start):
        """Append the valid entries of rows srcs after their first `start` to row dst, at its write position."""
        for src in srcs:
            cols = self.valid[src, :self.S - 1].nonzero()[start:, 0]
            L, m = self.length[dst], len(cols)
            if L + m > self.S - 1:
                raise RuntimeError(f"KV cache row full ({self.S - 1} columns)")
            for t in self.kv:
                t[dst, :, L:L + m] = t[src][:, cols]
            self.valid[dst, L:L + m], self.length[dst] = True, L + m

    def compact_due(self, n_live):
        return bucket(n_live) < bucket(self.n)  # a smaller bucket of rows would do

    def compact(self, keep):
        """Move the rows `keep` (ascending) down to rows 0..len(keep)-1."""
        n, idx = len(keep), torch.as_tensor(keep, dtype=torch.long, device=self.device)
        L = max([self.length[r] for r in keep], default=0)
        for t in self.kv:
            t[:n, :, :L] = t[idx, :, :L]
        self.valid[:n], self.valid[n:] = self.valid[idx], False
        self.length, self.n = [self.length[r] for r in keep] + [0] * (self.R - n), n


def free_bytes(device):  # what a new cache may take: 80% of a GPU's free memory; None on a CPU (no cap)
    return 0.8 * torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def for_call(model, o, prompts, group_size, cache):
    """The cache of a sample() call and its row cap: `cache` (a run's) or a new one (GPU: as free memory allows)."""
    device = next(model.parameters()).device
    cols = max(len(p) for p in prompts) + o.max_new_tokens + 1  # a row's worst case, +1 for the last token fed
    need = o.num_paths if o.parallel else 1  # rows of one rollout
    rows = o.max_rows or len(prompts) * group_size * need
    budget = free_bytes(device) if cache is None and o.max_rows is None else None
    if budget is not None:
        rows = min(rows, rows_for_budget(model.config, next(model.parameters()).dtype, cols, budget))
    if cache is None and rows >= need:
        cache = KVCache(rows, cols, device)
    elif cache is not None and cache.cols < cols:
        raise UsageError(f"the KV cache holds {cache.cols} columns per row, this call needs {cols} "
                         f"(prompt {cols - o.max_new_tokens - 1} + --max-new-tokens {o.max_new_tokens} + 1)")
    rows = min(rows, cache.R) if cache is not None else rows
    if rows < need:
        where = f"{budget / 1e9:.1f} GB of free GPU memory hold {rows} KV cache" if budget is not None \
            else f"the KV cache has {rows}"
        raise UsageError(f"{where} rows of {cols} columns, one rollout needs {need} "
                         f"(--num-paths): raise --kv-memory-gb or --max-rows, or lower --max-new-tokens")
    cache.reset(model)
    return cache, rows
