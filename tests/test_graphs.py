"""Tests for nanopr1/graphs.py: the CPU stand-in for CUDA graphs keeps a GPU's rules (a replay reads
only tensors that are still alive; nothing in a captured step waits for the host), and the KV cache's
captured decode steps obey them through whole sampler runs (admissions, Seen re-encodes, compactions,
several buckets). A capture failure is reported, an out-of-memory error is raised with the plan."""

import inspect

import pytest
import torch

from conftest import tiny_model
from fake_cuda import FakeAllocator
from reference_cache import reference_cache
from test_kvcache import StopAt, assert_same
from test_sampler import biased, prompts_of
from nanopr1 import graphs
from nanopr1.graphs import CpuGraph, FreedInputError, capturing
from nanopr1.kvcache import KVCache
from nanopr1.sampler import sample


def test_a_replay_recomputes_the_captured_ops_in_place():
    w, x, out = torch.randn(4, 4), torch.zeros(3, 4), torch.zeros(3, 4)
    g = CpuGraph()
    with capturing(g):
        out.copy_(torch.relu(x @ w) + 1)
    x.copy_(torch.randn(3, 4))
    g.replay()
    assert torch.equal(out, torch.relu(x @ w) + 1)
    assert g.pool_bytes >= 2 * 3 * 4 * 4  # the matmul's and the relu's outputs lived in the graph's pool


def test_a_replay_after_an_input_was_freed_raises():
    """The rule a CUDA graph cannot check: a tensor it reads must outlive it. Planted: a temporary."""
    out = torch.zeros(3)
    temp = torch.arange(3.0)
    g = CpuGraph()
    with capturing(g):
        out.copy_(temp * 2)
    g.replay()
    del temp
    with pytest.raises(FreedInputError, match="was freed"):
        g.replay()


X, MASK, COUNTS = torch.arange(6.0), torch.tensor([True, False] * 3), torch.tensor([1, 2, 0, 1, 1, 1])
WAITS = {  # each runs on a CPU without a word; a GPU's capture rejects it (it waits for the host)
    "item": lambda: X.sum().item(),
    "tolist": lambda: X.tolist(),
    "bool()": lambda: bool(MASK.any()),
    "int()": lambda: int(X[2]),
    "cpu()": lambda: X.cpu(),
    "numpy()": lambda: X.numpy(),
    "print": lambda: str(X),
    "equal": lambda: torch.equal(X, X),
    "allclose": lambda: torch.allclose(X, X),
    "nonzero": lambda: MASK.nonzero(),
    "where(mask)": lambda: torch.where(MASK),
    "argwhere": lambda: torch.argwhere(MASK),
    "masked_select": lambda: X.masked_select(MASK),
    "boolean index": lambda: X[MASK] + 1,
    "boolean index write": lambda: X.clone().__setitem__(MASK, 0.0),
    "index_put_ boolean": lambda: X.clone().index_put_((MASK,), torch.tensor(0.0)),
    "unique": lambda: torch.unique(X),
    "unique counts": lambda: X.unique(return_counts=True),
    "unique_consecutive": lambda: X.unique_consecutive(),
    "unique dim": lambda: torch.unique(X[None], dim=1),
    "repeat_interleave tensor": lambda: X.repeat_interleave(COUNTS),
    "bincount": lambda: torch.bincount(COUNTS),
    "one_hot": lambda: torch.nn.functional.one_hot(COUNTS),
}
STATIC = {  # their static-shaped neighbours capture
    "long index": lambda: X[torch.tensor([0, 2])] + 1,
    "long index write": lambda: X.clone().index_put_((torch.tensor([1]),), torch.tensor(5.0)),
    "masked_fill": lambda: X.masked_fill(MASK, 0.0),
    "where(mask, a, b)": lambda: torch.where(MASK, X, 0.0),
    "repeat_interleave int": lambda: X.repeat_interleave(2),
    "repeat_interleave output_size": lambda: X.repeat_interleave(COUNTS, output_size=6),
    "nonzero_static": lambda: torch.nonzero_static(MASK, size=6),
}


@pytest.mark.parametrize("name", WAITS)
def test_a_step_that_waits_for_the_host_cannot_be_captured(name):
    """Every op that reads a value back or has a data-dependent output shape (a GPU's capture rejects it)."""
    with pytest.raises(graphs.CaptureError, match="waits for the host"):
        with capturing(CpuGraph()):
            WAITS[name]()


@pytest.mark.parametrize("name", STATIC)
def test_static_shaped_ops_capture(name):
    with capturing(CpuGraph()):
        STATIC[name]()


def test_the_gpu_capture_measures_its_pool_and_checks_liveness(monkeypatch):
    """graphs.capture_cuda against the CUDA allocator's bookkeeping (tests/fake_cuda.py): 1.5 GB of cached
    free blocks (what loading leaves), which torch.cuda.graph drops on entry, and a step that takes 0.3 GB
    (warmed up outside the graph, then captured into the pool): the pool grew 0.3 GB (reading the reserved
    memory before emptying the cache gave a negative growth).
    Where the installed torch has it, the capture asks torch.cuda.graph to check its inputs are alive."""
    has = "check_input_liveness" in inspect.signature(torch.cuda.graph).parameters  # (torch 2.13: yes)
    fake = FakeAllocator(cached=1.5e9).install(monkeypatch)
    graph, grown = graphs.capture_cuda(lambda: fake.take(3e8), pool=None, device="cuda")
    assert grown == 3e8
    assert fake.graph_kwargs == ({"check_input_liveness": True} if has else {})


def test_the_caches_captured_steps_read_only_live_tensors(bpe_tokenizer):
    """A run with admissions (4 rows for 8 rollouts), Seen re-encodes, compactions and several buckets:
    every replay checked its inputs; afterwards they are the cache's buffers and the model's weights."""
    tok = bpe_tokenizer
    model = StopAt(biased(tok, par=3.0, path_end=1.0, summary_end=1.0), tok.eos_token_id, 19)
    prompts = prompts_of(tok) + prompts_of(tok, ["x = 4"])
    cache = KVCache(40, max(map(len, prompts)) + 61, "cpu", use_graphs=True)
    ref = sample(model, tok, prompts, 2, cache=reference_cache(), temperature=0, max_new_tokens=60, force_block=2)
    for cap in (None, 4):
        got = sample(model, tok, prompts, 2, cache=cache, temperature=0, max_new_tokens=60, force_block=2,
                     max_rows=cap)
        assert_same(ref, got)
    assert len(cache.captured.graphs) >= 2 and all(isinstance(g, CpuGraph) for g in cache.captured.graphs.values())
    held = [t for m in model.modules() for t in vars(m).values() if torch.is_tensor(t)]  # (Biased's tag ids)
    c = cache.captured
    persistent = {t.untyped_storage().data_ptr() for t in [*cache.tensors, cache.valid, c.row_ids, c.inputs,
                                                           c.logits, *model.parameters(), *model.buffers(), *held]}
    for g in c.graphs.values():
        for _, ref_, storage, _ in g.inputs:
            assert not storage.expired() and ref_().untyped_storage().data_ptr() in persistent


def test_the_old_capture_read_a_freed_tensor(bpe_tokenizer):
    """The bug this stand-in exists for (nanopr1's first GPU capture code): the row index tensor was made
    outside the capture and kept alive only by the cache's `feed` until the next prefill. Planted back in:
    the replay after that prefill fails, where a GPU would have written K/V into other rows."""
    class OldCapture(graphs.CapturedStep):
        def capture(self, model, rows, view):
            row_ids = torch.arange(rows)  # outside the graph, not kept with it
            if self.logits is None:
                self.logits = torch.zeros(self.cache.R, model.config.vocab_size)
            g = CpuGraph()
            with capturing(g):
                ids, pos, cols, real = self.inputs[:, :rows, None]
                self.logits[:rows].copy_(self.cache.run(model, ids, pos, row_ids, cols, real.bool(), view,
                                                        read=slice(0, rows)))
            self.graphs[(rows, view)] = g
            return g
    tok = bpe_tokenizer
    prompts = prompts_of(tok)
    cache = KVCache(2, max(map(len, prompts)) + 21, "cpu")
    cache.captured = OldCapture(cache, enabled=True)
    with pytest.raises(FreedInputError):  # 2 rows for 6 rollouts: the second admission's prefill frees `rows`
        sample(tiny_model(tok), tok, prompts, 2, cache=cache, parallel=False, max_new_tokens=20, temperature=0)


def test_a_failed_capture_decodes_eagerly_and_says_so(bpe_tokenizer):
    class ReadsAScalar(torch.nn.Module):  # a model whose forward waits for the host
        def __init__(self, model):
            super().__init__()
            self.model, self.config, self.generation_config = model, model.config, model.generation_config

        def forward(self, **kw):
            kw["position_ids"].max().item()
            return self.model(**kw)
    tok = bpe_tokenizer
    model, prompts = tiny_model(tok), prompts_of(tok)
    cache = KVCache(8, max(map(len, prompts)) + 21, "cpu", use_graphs=True)
    with pytest.warns(UserWarning, match="graph capture failed"):
        got = sample(ReadsAScalar(model), tok, prompts, 2, cache=cache, parallel=False, max_new_tokens=20,
                     temperature=0)
    assert "waits for the host" in cache.stats()["graph_error"] and not cache.captured.enabled
    assert_same(sample(model, tok, prompts, 2, cache=reference_cache(), parallel=False, max_new_tokens=20,
                       temperature=0), got)


def test_out_of_memory_during_capture_is_raised_with_the_plan(bpe_tokenizer, monkeypatch):
    def no_memory(graph):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(graphs, "capturing", no_memory)
    tok = bpe_tokenizer
    prompts = prompts_of(tok)
    cache = KVCache(8, max(map(len, prompts)) + 21, "cpu", use_graphs=True)
    cache.captured.note = "memory plan per GPU: (the plan's lines)"
    with pytest.raises(torch.OutOfMemoryError, match=r"(?s)capturing the decode step of 8 rows.*the plan's lines"
                                                     r".*--kv-memory-gb or --max-rows"):
        sample(tiny_model(tok), tok, prompts, 2, cache=cache, parallel=False, max_new_tokens=20)
