"""Tests for nanopr1/kvcache.py: KVRows against decoding from scratch, then the fast
path (StaticRows) against the simple one (KVRows).

For the fast path the reference is the default sampler (KVRows, tested here against
decoding from scratch and against the trainer in test_sampler.py). At temperature 0 the fast path
must give the same tokens, positions, forced flags, tag masks and block structure,
and the same log-probs (fp32 on the CPU). graphs="never" runs the static cache
eagerly; graphs="always" runs the decode step the way it is captured on a GPU (rows
padded to a bucket, static input buffers, a fixed attention width), re-run on a CPU
instead of replayed."""

import pytest
import torch

from conftest import tiny_model
from test_sampler import TEXTS, biased, prompts_of
from nanopr1 import kvcache
from nanopr1.format import PARALLEL, PATH, PATH_END
from nanopr1.kvcache import KVRows, StaticRows, bucket
from nanopr1.model import tag_ids
from nanopr1.sampler import sample

MORE = TEXTS + ["Final Answer: 42", "Dogs and cats have four legs.", "First, compute", "x = 4"]


# -----------------------------------------------------------------------------
# KVRows, the simple path


def test_forked_rows_match_decoding_from_scratch(bpe_tokenizer):
    """KV cloning: each path's per-token logits equal a no-cache forward of prefix + <Path> + path."""
    tok, model, t = bpe_tokenizer, tiny_model(bpe_tokenizer), tag_ids(bpe_tokenizer)
    prefix = prompts_of(tok)[0] + [t[PARALLEL]]
    paths = [[t[PATH]] + p + [t[PATH_END]] for p in prompts_of(tok, ["3 + 4 = 7", "Dogs have four legs.", "x"])]
    with torch.no_grad():
        kv = KVRows([], torch.zeros(1, 0, dtype=torch.bool))
        kv.forward(model, torch.tensor([prefix]), torch.arange(len(prefix))[None], torch.ones(1, len(prefix), dtype=torch.bool))
        kv = kv.rows([0] * len(paths))  # the fork: clone the prefix row
        got = [[] for _ in paths]
        for j in range(max(len(p) for p in paths)):  # all paths decoded together, finished ones padded
            live = [j < len(p) for p in paths]
            ids = torch.tensor([[p[j] if j < len(p) else 0] for p in paths])
            logits = kv.forward(model, ids, torch.full((len(paths), 1), len(prefix) + j), torch.tensor(live)[:, None])
            for k in range(len(paths)):
                if live[k]:
                    got[k].append(logits[k])
        for k, p in enumerate(paths):
            ref = model(input_ids=torch.tensor([prefix + p])).logits[0, len(prefix):]
            assert (torch.stack(got[k]) - ref).abs().max() <= 1e-4


def test_compaction_keeps_what_rows_attend_to(bpe_tokenizer):
    tok, model = bpe_tokenizer, tiny_model(bpe_tokenizer)
    prompts = prompts_of(tok)
    with torch.no_grad():
        P = max(len(p) for p in prompts)
        kv = KVRows([], torch.zeros(3, 0, dtype=torch.bool))
        ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
        q_valid = torch.tensor([[j >= P - len(p) for j in range(P)] for p in prompts])
        kv.forward(model, ids, (torch.arange(P)[None] - (P - torch.tensor([len(p) for p in prompts]))[:, None]).clamp(min=0), q_valid)
        kv.valid[1] = False  # row 1 finished
        nxt, pos = torch.tensor([[5], [0], [7]]), torch.tensor([[len(prompts[0])], [0], [len(prompts[2])]])
        ref = kv.rows([0, 1, 2]).forward(model, nxt, pos, torch.ones(3, 1, dtype=torch.bool))
        kv.compact([0, 2])
        assert kv.valid.shape == (2, max(len(prompts[0]), len(prompts[2]))) and kv.waste() < 0.5
        got = kv.forward(model, nxt[[0, 2]], pos[[0, 2]], torch.ones(2, 1, dtype=torch.bool))
        assert (got - ref[[0, 2]]).abs().max() <= 1e-5


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
            kv, _ = StaticRows.prefill(model, ids, pos, torch.ones(1, len(p), dtype=torch.bool), [0], rows, 40)
            kv.grow(rows - 1)
            out = []
            for j in range(5):
                live = torch.tensor([[True]] + [[False]] * (rows - 1))
                step_ids = torch.tensor([[7 + j]] + [[3]] * (rows - 1))
                step_pos = torch.tensor([[len(p) + j]] + [[0]] * (rows - 1))
                out.append(kv.forward(model, step_ids, step_pos, live)[0])
            got.append(torch.stack(out))
            assert kv.length == [len(p) + 5] + [0] * (rows - 1) and not kv.valid[1:].any()
    assert (got[0] - got[1]).abs().max() <= 1e-5


def test_buckets():
    assert [bucket(n) for n in (1, 2, 8, 9, 33, 64, 65, 256, 257, 600)] == [1, 8, 8, 32, 64, 64, 128, 256, 512, 768]
    assert kvcache.VIEW == 256


@torch.no_grad()
def test_full_row_is_an_error(bpe_tokenizer):
    model = tiny_model(bpe_tokenizer)
    kv, _ = StaticRows.prefill(model, torch.tensor([[5, 6, 7]]), torch.arange(3)[None], torch.ones(1, 3, dtype=torch.bool),
                               [0], 1, 4)  # 4 columns: the prompt and one more token
    kv.forward(model, torch.tensor([[8]]), torch.tensor([[3]]), torch.tensor([[True]]))
    with pytest.raises(RuntimeError, match="row full"):
        kv.forward(model, torch.tensor([[9]]), torch.tensor([[4]]), torch.tensor([[True]]))
