"""Tests for nanopr1/kvcache.py (KVRows, the simple cache) and for the sampler's row cap
(max_rows) on both caches: the same rollouts whatever the cap, and never more rows than it."""

import pytest
import torch

from conftest import tiny_model
from test_sampler import biased, prompts_of
from nanopr1 import kvcache
from nanopr1.format import PARALLEL, PATH, PATH_END
from nanopr1.kvcache import KVRows
from nanopr1.model import tag_ids
from nanopr1.sampler import sample
from nanopr1.staticcache import StaticRows


def empty(rows):
    return KVRows(valid=torch.zeros(rows, 0, dtype=torch.bool))


@torch.no_grad()
def test_forked_rows_match_decoding_from_scratch(bpe_tokenizer):
    """KV cloning: each path's per-token logits equal a no-cache forward of prefix + <Path> + path."""
    tok, model, t = bpe_tokenizer, tiny_model(bpe_tokenizer), tag_ids(bpe_tokenizer)
    prefix = prompts_of(tok)[0] + [t[PARALLEL]]
    paths = [[t[PATH]] + p + [t[PATH_END]] for p in prompts_of(tok, ["3 + 4 = 7", "Dogs have four legs.", "x"])]
    kv = empty(1)
    kv.forward(model, torch.tensor([prefix]), torch.arange(len(prefix))[None], torch.ones(1, len(prefix), dtype=torch.bool))
    kv = kv.rows([0] * len(paths))  # the fork: clone the prefix row
    got = [[] for _ in paths]
    for j in range(max(len(p) for p in paths)):  # all paths decoded together, finished ones padded
        live = [j < len(p) for p in paths]
        ids = torch.tensor([[p[j] if j < len(p) else 0] for p in paths])
        logits = kv.step(model, ids, torch.full((len(paths), 1), len(prefix) + j), torch.tensor(live)[:, None])
        for k in range(len(paths)):
            if live[k]:
                got[k].append(logits[k])
    for k, p in enumerate(paths):
        ref = model(input_ids=torch.tensor([prefix + p])).logits[0, len(prefix):]
        assert (torch.stack(got[k]) - ref).abs().max() <= 1e-4


@torch.no_grad()
def test_compaction_keeps_what_rows_attend_to(bpe_tokenizer):
    tok, model = bpe_tokenizer, tiny_model(bpe_tokenizer)
    prompts = prompts_of(tok)
    P = max(len(p) for p in prompts)
    kv = empty(3)
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    q_valid = torch.tensor([[j >= P - len(p) for j in range(P)] for p in prompts])
    kv.forward(model, ids, (torch.arange(P)[None] - (P - torch.tensor([len(p) for p in prompts]))[:, None]).clamp(min=0), q_valid)
    kv.free(1)  # row 1 finished
    nxt, pos = torch.tensor([[5], [0], [7]]), torch.tensor([[len(prompts[0])], [0], [len(prompts[2])]])
    ref = kv.rows([0, 1, 2]).forward(model, nxt, pos, torch.ones(3, 1, dtype=torch.bool))
    kv.compact([0, 2])
    assert kv.valid.shape == (2, max(len(prompts[0]), len(prompts[2]))) and kv.valid.float().mean() > 0.5
    got = kv.forward(model, nxt[[0, 2]], pos[[0, 2]], torch.ones(2, 1, dtype=torch.bool))
    assert (got - ref[[0, 2]]).abs().max() <= 1e-5


@torch.no_grad()
def test_decode_steps_write_in_place(bpe_tokenizer):
    """A decode step writes its column into spare capacity: the K/V tensors are re-allocated a few
    times over 200 steps (growth by half), not at every token as a concatenating cache is."""
    tok, model = bpe_tokenizer, tiny_model(bpe_tokenizer)
    p = prompts_of(tok)[0]
    kv = empty(2)
    kv.forward(model, torch.tensor([p, p]), torch.arange(len(p)).repeat(2, 1), torch.ones(2, len(p), dtype=torch.bool))
    ptrs = []
    for j in range(200):
        kv.step(model, torch.tensor([[7], [8]]), torch.full((2, 1), len(p) + j), torch.ones(2, 1, dtype=torch.bool))
        ptrs.append(kv.kv[0].data_ptr())
    assert kv.S == len(p) + 200 and kv.kv[0].shape[2] >= kv.S
    assert len(set(ptrs)) <= 8


@torch.no_grad()
def test_the_model_must_use_the_cache(bpe_tokenizer, monkeypatch):
    """If transformers stops passing our cache to the attention layers (a renamed keyword), the sampler
    fails loudly instead of decoding without a cache."""
    tok = bpe_tokenizer
    monkeypatch.setattr(kvcache, "CACHE_KW", "not_a_cache_keyword")
    with pytest.raises(RuntimeError, match="ignored the KV cache"):
        sample(tiny_model(tok), tok, prompts_of(tok)[:1], max_new_tokens=3, temperature=0, parallel=False)

# -----------------------------------------------------------------------------
# the row cap: same rollouts at temperature 0 whatever max_rows is, never more rows than max_rows


class CountRows:
    """Wraps a cache class: records the rows the cache holds at every decode step."""

    def __init__(self, monkeypatch):
        self.seen = []
        for cls in (KVRows, StaticRows):
            step = cls.step
            monkeypatch.setattr(cls, "step", lambda kv, *a, _step=step: self.seen.append(self.rows(kv)) or _step(kv, *a))

    @staticmethod
    def rows(kv):
        return kv.n if isinstance(kv, StaticRows) else kv.valid.shape[0]


CAP_CASES = [  # (name, bias, sample kwargs)
    ("parallel off", {}, dict(parallel=False)),
    ("seen blocks", dict(par=3.0, path_end=1.0, summary_end=1.0), dict(variant="seen", force_block=2)),
    ("unseen blocks", dict(par=3.0, path_end=1.0, summary_end=1.0), dict(variant="unseen", force_block=2)),
]


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("name, bias, kw", CAP_CASES, ids=[c[0] for c in CAP_CASES])
def test_max_rows_gives_the_same_rollouts(bpe_tokenizer, monkeypatch, fast, name, bias, kw):
    tok = bpe_tokenizer
    model = biased(tok, **bias) if bias else tiny_model(tok)
    prompts = prompts_of(tok) + prompts_of(tok, ["x = 4", "Dogs and cats have four legs."])
    count = CountRows(monkeypatch)
    runs = {}
    for cap in (2, 3, 5, None):
        count.seen = []
        runs[cap] = sample(model, tok, prompts, 2, max_new_tokens=40, temperature=0, max_rows=cap, fast=fast, **kw)
        assert count.seen and max(count.seen) <= (cap or 10 * 2)
    blocks = sum(len(r.blocks) for r in runs[None])
    assert (blocks > 0) == ("force_block" in kw)
    for cap in (2, 3, 5):
        for a, b in zip(runs[None], runs[cap], strict=True):
            assert (a.ids, a.positions, a.forced, a.allowed, a.blocks) == (b.ids, b.positions, b.forced, b.allowed, b.blocks)
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-5


@pytest.mark.parametrize("fast", [False, True])
def test_fork_storm_completes_under_a_tight_cap(bpe_tokenizer, monkeypatch, fast):
    """Every rollout opens blocks of 3 paths as soon as it can; 3 rows hold one rollout at a time."""
    tok = bpe_tokenizer
    model = biased(tok, par=50.0, path_end=6.0, summary_end=6.0)
    count = CountRows(monkeypatch)
    rollouts = sample(model, tok, prompts_of(tok), 4, num_paths=3, max_new_tokens=60, max_rows=3, seed=0,
                      variant="unseen", fast=fast)
    assert len(rollouts) == 12 and all(r.stop_reason in ("eos", "budget") for r in rollouts)
    assert sum(len(r.blocks) for r in rollouts) >= 24 and all(r.format_error is None for r in rollouts)
    assert max(count.seen) == 3


def test_a_cap_below_one_rollout_is_refused(bpe_tokenizer):
    with pytest.raises(ValueError, match="max_rows=1: one rollout needs 2 rows"):
        sample(tiny_model(bpe_tokenizer), bpe_tokenizer, prompts_of(bpe_tokenizer), max_rows=1)
