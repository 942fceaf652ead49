"""Tests for nanopr1/staticcache.py: the fast path (StaticRows) against the simple one
(KVRows, tested in test_kvcache.py against decoding from scratch and in test_sampler.py
against the trainer). At temperature 0 the fast path
must give the same tokens, positions, forced flags, tag masks and block structure,
and the same log-probs (fp32 on the CPU). graphs="never" runs the static cache
eagerly; graphs="always" runs the decode step the way it is captured on a GPU (rows
padded to a bucket, static input buffers, a fixed attention width), re-run on a CPU
instead of replayed."""

import pytest
import torch

from conftest import tiny_model
from test_sampler import TEXTS, biased, prompts_of
from nanopr1 import staticcache
from nanopr1.staticcache import StaticRows, bucket
from nanopr1.sampler import sample

MORE = TEXTS + ["Final Answer: 42", "Dogs and cats have four legs.", "First, compute", "x = 4"]


# -----------------------------------------------------------------------------
# StaticRows, the fast path: the same rollouts as the simple path


class StopAt(torch.nn.Module):
    """Makes EOS (or the closing tag, inside a path or summary) win at one position id: rollouts whose
    prompts differ in length stop at different times, so rows are freed, reused and compacted."""

    def __init__(self, model, eos, position):
        super().__init__()
        self.model, self.config, self.generation_config = model, model.config, model.generation_config
        self.eos, self.position = eos, position

    def forward(self, **kw):
        out = self.model(**kw)
        pos = kw["position_ids"][:, -out.logits.shape[1]:]  # (B, T) the positions the logits predict after
        out.logits[..., self.eos] += 100.0 * (pos % self.position == self.position - 1)
        return out


def run_both(model, tok, prompts, graphs, monkeypatch, **kw):
    monkeypatch.setattr(StaticRows, "graphs", graphs)
    kw = {"temperature": 0, "max_new_tokens": 60, **kw}
    return sample(model, tok, prompts, 2, **kw), sample(model, tok, prompts, 2, fast=True, **kw)


def assert_same(simple, fast, tol=1e-5):
    for a, b in zip(simple, fast, strict=True):
        assert (a.ids, a.positions, a.forced, a.allowed, a.blocks, a.stop_reason) == \
               (b.ids, b.positions, b.forced, b.allowed, b.blocks, b.stop_reason)
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= tol


CASES = [  # (name, bias, sample kwargs)
    ("parallel off", {}, dict(parallel=False)),
    ("seen, forced block", dict(par=3.0, path_end=2.0, summary_end=2.0), dict(variant="seen", force_block=3)),
    ("unseen, forced block", dict(par=3.0, path_end=2.0, summary_end=2.0), dict(variant="unseen", force_block=3)),
    ("unseen, 3 paths, path budget", dict(par=4.0, path_end=-5.0), dict(variant="unseen", num_paths=3,
                                                                       force_block=0, path_max_tokens=7)),
]


@pytest.mark.parametrize("graphs", ["never", "always"])
@pytest.mark.parametrize("name, bias, kw", CASES, ids=[c[0] for c in CASES])
def test_fast_equals_simple_greedy(bpe_tokenizer, monkeypatch, graphs, name, bias, kw):
    tok = bpe_tokenizer
    model = biased(tok, **bias) if bias else tiny_model(tok)
    simple, fast = run_both(model, tok, prompts_of(tok), graphs, monkeypatch, **kw)
    assert_same(simple, fast)
    assert all(len(r.blocks) >= 1 for r in simple) == ("force_block" in kw)


@pytest.mark.parametrize("variant", ["seen", "unseen"])
def test_fast_equals_simple_when_rows_finish_apart(bpe_tokenizer, monkeypatch, variant):
    """Rollouts stop at different steps: freed rows, reused rows and row compaction (smaller buckets)."""
    tok = bpe_tokenizer
    model = StopAt(biased(tok, par=3.0, path_end=1.0, summary_end=1.0), tok.eos_token_id, 23)
    compactions = []
    original = StaticRows.compact
    monkeypatch.setattr(StaticRows, "compact", lambda self, keep: compactions.append(len(keep)) or original(self, keep))
    simple, fast = run_both(model, tok, prompts_of(tok, MORE), "always", monkeypatch, variant=variant,
                            force_block=2, max_new_tokens=50)
    assert_same(simple, fast)
    assert len({len(r.ids) for r in simple}) >= 3 and any(r.stop_reason == "eos" for r in simple)
    assert compactions and all(n < 14 for n in compactions)


def test_fast_sampling_is_seeded(bpe_tokenizer):
    tok, model = bpe_tokenizer, biased(bpe_tokenizer, par=2.0, path_end=2.0, summary_end=2.0)
    run = lambda seed: sample(model, tok, prompts_of(tok), 2, max_new_tokens=40, seed=seed, variant="unseen", fast=True)
    a, b, c = run(5), run(5), run(6)
    assert [r.ids for r in a] == [r.ids for r in b] and [r.ids for r in a] != [r.ids for r in c]


def test_dead_rows_never_disturb_live_ones(bpe_tokenizer, monkeypatch):
    """A row padded into a bucket, or freed, writes only the scratch column: a live row's logits do not
    depend on how many dead rows share its step."""
    tok, model = bpe_tokenizer, tiny_model(bpe_tokenizer)
    monkeypatch.setattr(StaticRows, "graphs", "always")
    p = prompts_of(tok)[0]
    ids, pos = torch.tensor([p]), torch.arange(len(p))[None]
    got = []
    with torch.no_grad():
        for rows in (1, 5):  # one row alone (bucket 1) / with 4 free rows (bucket 8, 7 dead)
            kv = StaticRows(rows, 40, "cpu")
            kv.reset(model)
            kv.add_rows(rows)
            kv.prefill(model, ids, pos, torch.ones(1, len(p), dtype=torch.bool), [0])
            out = []
            for j in range(5):
                live = torch.tensor([[True]] + [[False]] * (rows - 1))
                step_ids = torch.tensor([[7 + j]] + [[3]] * (rows - 1))
                step_pos = torch.tensor([[len(p) + j]] + [[0]] * (rows - 1))
                out.append(kv.step(model, step_ids, step_pos, live)[0])
            got.append(torch.stack(out))
            assert kv.length == [len(p) + 5] + [0] * (rows - 1) and not kv.valid[1:].any()
    assert (got[0] - got[1]).abs().max() <= 1e-5


def test_buckets():
    assert [bucket(n) for n in (1, 2, 8, 9, 33, 64, 65, 256, 257, 600)] == [1, 8, 8, 32, 64, 64, 128, 256, 512, 768]
    assert staticcache.VIEW == 256


@torch.no_grad()
def test_full_row_is_an_error(bpe_tokenizer):
    model = tiny_model(bpe_tokenizer)
    kv = StaticRows(1, 4, "cpu")  # 4 columns: the prompt and one more token
    kv.reset(model)
    kv.add_rows(1)
    kv.prefill(model, torch.tensor([[5, 6, 7]]), torch.arange(3)[None], torch.ones(1, 3, dtype=torch.bool), [0])
    kv.step(model, torch.tensor([[8]]), torch.tensor([[3]]), torch.tensor([[True]]))
    with pytest.raises(RuntimeError, match="row full"):
        kv.step(model, torch.tensor([[9]]), torch.tensor([[4]]), torch.tensor([[True]]))
