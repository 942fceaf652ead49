"""The reference KV cache the package's KVCache is tested against: the simplest cache that does the
sampler's operations. One tensor per layer for K and one for V, (R, H, C, D), plus a (R, S) bool `valid`
mask over the S columns in use; every row appends at the same column each step (a row without a real
token gets an invalid column), free rows and dead columns are squeezed out now and then. No buckets, no
scratch column, no graphs: an independent implementation of what KVCache does."""

import torch
from transformers.cache_utils import Cache


class RowWriter(Cache):
    def __init__(self, rows):
        super().__init__(layers=[])
        self.rows = rows

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.rows.write_layer(layer_idx, key_states, value_states)


def run_model(model, rows, **inputs):
    out = model(**inputs, cache=RowWriter(rows), use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float()


class KVRows:
    """tensors = [K0, V0, K1, V1, ...] each (R, H, C, D); valid (R, S): which of the S used columns hold
    entries."""

    def __init__(self, tensors=None, valid=None, device="cpu"):
        self.tensors = tensors or []
        self.valid = valid if valid is not None else torch.zeros(0, 0, dtype=torch.bool, device=device)
        self.feed = 0  # columns fed by the forward in progress (write_layer writes them at S..S+Q-1)

    @property
    def S(self):
        return self.valid.shape[1]

    def forward(self, model, ids, pos, real):
        """Feed (R, Q) tokens at explicit positions into every row, as Q new columns; logits (R, V)."""
        ids, pos, real = (x.to(self.valid.device) for x in (ids, pos, real))
        R, Q = ids.shape
        new = torch.ones(Q, Q, dtype=torch.bool, device=ids.device).tril() & real[:, None, :]  # (R, Q, Q)
        new |= torch.eye(Q, dtype=torch.bool, device=ids.device)  # a pad query sees itself: no row fully masked
        mask = torch.cat([self.valid[:, None, :].expand(R, Q, -1), new], 2)[:, None]  # (R, 1, Q, S+Q)
        self.feed = Q
        logits = run_model(model, self, input_ids=ids, position_ids=pos, attention_mask=mask)
        self.valid = torch.cat([self.valid, real], 1)
        return logits

    def write_layer(self, layer, k, v):
        """Store k, v (R, H, Q, D) at columns S..S+Q-1 of every row; return K, V of columns 0..S+Q-1."""
        S, Q = self.S, self.feed
        if len(self.tensors) <= 2 * layer:  # first write: allocate with the model's dtype and heads
            self.tensors += [x.new_zeros(x.shape[0], x.shape[1], 0, x.shape[3]) for x in (k, v)]
        out = []
        for j, x in ((2 * layer, k), (2 * layer + 1, v)):
            if self.tensors[j].shape[2] < S + Q:  # grow by half: a copy now and then, not at every token
                t = self.tensors[j]
                self.tensors[j] = t.new_zeros(t.shape[0], t.shape[1], S + Q + max(64, S // 2), t.shape[3])
                self.tensors[j][:, :, :S] = t[:, :, :S]
            self.tensors[j][:, :, S:S + Q] = x
            out.append(self.tensors[j][:, :, :S + Q])
        return out

    def rows(self, idx):
        """A new KVRows holding copies of rows idx (used columns only)."""
        idx = torch.as_tensor(idx, device=self.valid.device)
        return KVRows([t[idx, :, :self.S] for t in self.tensors], self.valid[idx])

    def write(self, slots, other):
        """Rows `slots` := the rows of another KVRows, at columns 0.. (the rest of those rows invalid)."""
        S = other.S
        if S > self.S:
            self._grow(cols=S - self.S)
        if not self.tensors:
            self.tensors = [t.new_zeros(len(self.valid), t.shape[1], self.S, t.shape[3]) for t in other.tensors]
        idx = torch.as_tensor(slots, device=self.valid.device)
        for t, o in zip(self.tensors, other.tensors):
            t[idx, :, :S] = o[:, :, :S]
        self.valid[idx, :S], self.valid[idx, S:] = other.valid, False

    def _grow(self, rows=0, cols=0):
        """Add free rows and unused columns (the allocation keeps its spare columns)."""
        S = self.S
        for j, t in enumerate(self.tensors):
            if rows or t.shape[2] < S + cols:
                new = t.new_zeros(t.shape[0] + rows, t.shape[1], max(t.shape[2], S + cols), t.shape[3])
                new[:t.shape[0], :, :S] = t[:, :, :S]
                self.tensors[j] = new
        self.valid = torch.nn.functional.pad(self.valid, (0, cols, 0, rows))

    # -- the operations the sampler uses

    def prefill(self, model, ids, pos, real, slots):
        prompts = KVRows(device=self.valid.device)
        prompts.valid = torch.zeros(len(ids), 0, dtype=torch.bool, device=self.valid.device)
        logits = prompts.forward(model, ids, pos, real)
        self.write(slots, prompts)
        return logits

    def step(self, model, ids, pos, real):
        return self.forward(model, ids, pos, real)

    def extend(self, model, ids, pos, real, rows):
        sub = self.rows(rows)
        sub.forward(model, ids, pos, real)
        self.write(rows, sub)

    def add_rows(self, n):
        self._grow(rows=n)

    def copy_row(self, src, dst):
        for t in self.tensors:
            t[dst] = t[src]
        self.valid[dst] = self.valid[src]

    def free(self, i):
        self.valid[i] = False

    def entries(self, i, start=0):
        """The valid entries of row i, in order, from the start-th on: [K0, V0, ...] each (H, n, D)."""
        cols = self.valid[i].nonzero()[start:, 0]
        return [t[i][:, cols] for t in self.tensors]

    def merge(self, dst, srcs, start):
        entries = [torch.cat(layer, 1) for layer in zip(self.entries(dst), *(self.entries(s, start) for s in srcs))]
        n = entries[0].shape[1]
        self.write([dst], KVRows([e[None] for e in entries], torch.ones(1, n, dtype=torch.bool, device=self.valid.device)))

    def compact_due(self, n_live):
        """Squeeze once free rows and dead columns are half the cache."""
        return self.valid.numel() > 256 and 1.0 - self.valid.sum().item() / self.valid.numel() > 0.5

    def compact(self, keep):
        """Keep rows `keep` and squeeze out the columns that are invalid in all of them."""
        valid = self.valid[keep]
        order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices  # valid columns first, in order
        order = order[:, :int(valid.sum(1).max()) if len(keep) else 0]  # (R', S')
        index = order[:, None, :, None]
        self.tensors = [t[keep, :, :self.S].gather(2, index.expand(-1, t.shape[1], -1, t.shape[3]))
                        for t in self.tensors]
        self.valid = valid.gather(1, order)


def reference_cache():
    """An empty KVRows as sample(cache=...) takes it: unbounded rows and columns."""
    cache = KVRows()
    cache.R = cache.cols = 1 << 30  # rows and columns: as many as needed
    cache.reset = lambda model: None
    return cache
