"""
The KV cache of the branching sampler, the same on a CPU and a GPU: R rows of `cols` columns per layer,
allocated once from a memory budget and kept for a whole run. A row holds one rollout's main line or one
of its paths, and appends at its own write position. Parallel thinking is two operations on rows: a fork
copies the prefix's row into each path's row (`copy_row`), and a merge appends the paths' entries to the
main line's row (`merge`). Simplification: every row holds the worst case, the longest prompt +
max_new_tokens + 1 (the last token fed; no paging).

The decode step is delegated to graphs.CapturedStep, which captures it as a graph per shape and replays
it: on a GPU; a CPU decodes eagerly (faster there) unless NANOPR1_CPU_GRAPHS=1 turns the CPU stand-in
on, as the tests do.
"""

import torch
from transformers.cache_utils import Cache

from nanopr1 import UsageError
from nanopr1.graphs import VIEW, CapturedStep, bucket


class KVCache:
    """R rows of `cols` columns, plus a scratch column (index `cols`) where the tokens that are not real write
    (padding, or the token of a row with nothing to feed)."""

    def __init__(self, max_rows, max_cols, device, use_graphs=None):
        self.R, self.cols, self.device = max_rows, max_cols, torch.device(device)
        # [K0, V0, K1, V1, ...] each (R, H, cols + 1, D), allocated by the first forward (the model's dtype)
        self.tensors = []
        self.valid = torch.zeros(self.R, self.cols + 1, dtype=torch.bool, device=device)  # columns with entries
        self.length = [0] * self.R  # (on the host) the column where each row writes next
        self.n = 0  # rows 0..n-1 are in use by the sampler
        self.captured = CapturedStep(self, use_graphs)  # the decode step as graphs (graphs.py)

    def reset(self, model):
        """A sample() call starts: no rows in use."""
        self.captured.reset(model)
        self.valid.zero_()
        self.length, self.n = [0] * self.R, 0

    def stats(self):
        return self.captured.stats()

    # -----------------------------------------------------------------------------
    # the cache's own operations: take rows, fork, merge, free, compact

    def add_rows(self, n):
        if self.n + n > self.R:
            raise RuntimeError(f"KV cache has {self.R} rows, {self.n + n} needed")
        self.n += n

    def _advance(self, row, k):
        """Row `row` takes its next k columns."""
        if self.length[row] + k > self.cols:
            raise RuntimeError(f"KV cache row full ({self.cols} columns)")
        self.length[row] += k

    def copy_row(self, src, dst):
        """The fork: row dst becomes a copy of row src (its entries, valid columns and write position)."""
        L = self.length[src]
        for t in self.tensors:
            t[dst, :, :L] = t[src, :, :L]
        self.valid[dst], self.length[dst] = self.valid[src], L

    def merge(self, dst, srcs, start):
        """Append the valid entries of rows srcs after their first `start` to row dst, at its write position."""
        # appending a path's entries after the main line's, out of position order, is valid: RoPE is already
        # applied inside the stored keys (a key's position travels with it), and attention needs only `valid`
        for src in srcs:
            cols = self.valid[src].nonzero()[start:, 0]
            L, m = self.length[dst], len(cols)
            self._advance(dst, m)
            for t in self.tensors:
                t[dst, :, L:L + m] = t[src][:, cols]
            self.valid[dst, L:L + m] = True

    def free(self, i):
        self.valid[i], self.length[i] = False, 0

    def compact_due(self, n_live):
        # the decode step pads the rows in use to a bucket: compact when a smaller bucket would do
        return bucket(n_live) < bucket(self.n)

    def compact(self, keep):
        """Move the rows `keep` (ascending) down to rows 0..len(keep)-1."""
        n, idx = len(keep), torch.as_tensor(keep, dtype=torch.long, device=self.device)
        # the kept rows' entries up to the longest of them, then their valid columns and write positions
        L = max([self.length[r] for r in keep], default=0)
        for t in self.tensors:
            t[:n, :, :L] = t[idx, :, :L]
        self.valid[:n], self.valid[n:] = self.valid[idx], False
        self.length, self.n = [self.length[r] for r in keep] + [0] * (self.R - n), n

    # -----------------------------------------------------------------------------
    # a forward through the cache: each row's tokens go to its next columns and attend to its valid ones

    def forward(self, model, ids, pos, real, rows):
        """Feed (n, Q) tokens of rows `rows` at their next columns; the last query's logits (n, V) fp32."""
        rows = list(rows)
        cols, view = self.columns(rows, real.cpu())
        dev = self.device
        index = torch.as_tensor(rows, device=dev)
        # rows 0..n-1 (the decode step's, often a prompt's) are read as a slice, other rows gathered
        read = slice(0, len(rows)) if rows == list(range(len(rows))) else index
        return self.run(model, ids.to(dev), pos.to(dev), index, cols.to(dev), real.to(dev), view, read)

    # the sampler's wide forwards: prompts (left-padded) into their rows, and the Seen merge's re-encoding of
    # the later paths into the main line's row
    prefill = extend = forward

    def step(self, model, ids, pos, real):
        """One token (n, 1) for each row in use; real (n, 1): which rows have a real token. Logits (n, V)."""
        # the captured step where it is on; a forward under autocast runs eagerly
        if self.captured.enabled and not torch.is_autocast_enabled(self.device.type):
            return self.captured.step(model, ids, pos, real)
        return self.forward(model, ids, pos, real, range(self.n))

    def columns(self, rows, real):
        """Where each token is written (n, Q), and how many columns the step attends to; moves the rows on."""
        start = torch.tensor([self.length[r] for r in rows])[:, None]
        # real tokens take a row's next columns in order, the others the scratch column
        cols = torch.where(real, start + real.cumsum(1) - 1, self.cols)  # (n, Q)
        for r, k in zip(rows, real.sum(1).tolist()):
            self._advance(r, k)
        # the step attends to the longest row's columns, rounded up so that its shapes take a few values
        return cols, min(-(-max(self.length[r] for r in rows) // VIEW) * VIEW, self.cols)

    def run(self, model, ids, pos, rows, cols, real, view, read):
        """One forward (eager, or being captured): mark the columns, build the mask, run the model.
        rows: the row indices (n,); read: the same rows, as a slice where they are 0..n-1 (no copy)."""
        self.valid[rows[:, None], cols] = real
        valid = self.valid[read, :view]  # (n, view)
        # a query sees the valid columns up to its own (a row's columns are in the order they were written),
        # and its own column (a token that is not real: column view-1), so that no query's mask is empty
        col = torch.arange(view, device=cols.device)
        mask = valid[:, None, :] & (col <= cols[:, :, None])  # (n, Q, view)
        mask |= col == cols.clamp(max=view - 1)[:, :, None]
        # the model writes each layer's new K/V through the writer and attends to what it hands back
        writer = _Writer(self, (rows, cols, view, read))
        out = model(input_ids=ids, position_ids=pos, attention_mask=mask[:, None], cache=writer, use_cache=True,
                    logits_to_keep=1)
        if writer.calls == 0:  # a transformers release that renamed the cache keyword again
            raise RuntimeError("the model ignored the KV cache (passed as `cache=`): see pyproject.toml")
        return out.logits[:, -1].float()

    def write_layer(self, layer, k, v, rows, cols, view, read):
        """Store one layer's k, v (n, H, Q, D) at the tokens' columns; return its K, V (n, H, view, D)."""
        if len(self.tensors) <= 2 * layer:  # first write: allocate with the model's dtype and heads
            self.tensors += [x.new_zeros(self.R, x.shape[1], self.cols + 1, x.shape[3]) for x in (k, v)]
        out = []
        for t, x in zip(self.tensors[2 * layer:2 * layer + 2], (k, v)):
            # (n, Q, H, D) at each row's own columns, then the columns the queries attend to
            t.transpose(1, 2)[rows[:, None], cols] = x.transpose(1, 2)
            out.append(t[read, :, :view])
        return out


class _Writer(Cache):
    """What the model sees as its cache: each attention layer's update() hands its K/V to the rows."""

    def __init__(self, cache, where):
        super().__init__(layers=[])
        self.cache, self.where, self.calls = cache, where, 0  # where: (rows, cols, view, read)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.calls += 1
        return self.cache.write_layer(layer_idx, key_states, value_states, *self.where)


# -----------------------------------------------------------------------------
# sizing: the bytes of a row, the rows a budget holds, and the cache of one sample() call


def kv_bytes_per_token(config, dtype):
    """K and V of every layer for one token of one row."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8


def rows_for_budget(config, dtype, max_cols, budget_bytes):
    """How many rows of `max_cols` columns (plus the scratch column) fit in `budget_bytes`."""
    return int(budget_bytes // ((max_cols + 1) * kv_bytes_per_token(config, dtype)))


def free_bytes(device):
    """What a new cache may take: 80% of a GPU's free memory; None on a CPU (no cap)."""
    return 0.8 * torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def for_call(model, o, prompts, group_size, cache):
    """The cache of a sample() call and its row cap: the run's `cache`, or a new one (a GPU's as free memory
    allows)."""
    weight = next(model.parameters())
    # a row's worst case: the longest prompt, every new token, and the last one fed
    cols = max(len(p) for p in prompts) + o.max_new_tokens + 1
    need = o.num_paths if o.parallel else 1  # rows of one rollout
    # every rollout's rows at once, unless capped by --max-rows, the given cache, or a GPU's free memory
    rows = o.max_rows or len(prompts) * group_size * need
    budget = free_bytes(weight.device) if cache is None and o.max_rows is None else None
    if budget is not None:
        rows = min(rows, rows_for_budget(model.config, weight.dtype, cols, budget))
    if cache is not None and cache.cols < cols:
        raise UsageError(f"the KV cache holds {cache.cols} columns per row, this call needs {cols} "
                         f"(prompt {cols - o.max_new_tokens - 1} + --max-new-tokens {o.max_new_tokens} + 1)")
    rows = min(rows, cache.R) if cache is not None else rows
    # fewer rows than one rollout needs would admit nothing: a usage error, before any work
    if rows < need:
        where = f"{budget / 1e9:.1f} GB of free GPU memory hold {rows} KV cache" if budget is not None \
            else f"the KV cache has {rows}"
        raise UsageError(f"{where} rows of {cols} columns, one rollout needs {need} "
                         f"(--num-paths): raise --kv-memory-gb or --max-rows, or lower --max-new-tokens")
    cache = cache if cache is not None else KVCache(rows, cols, weight.device)
    cache.reset(model)
    return cache, rows
