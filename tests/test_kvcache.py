"""Tests for nanopr1/kvcache.py, the one KV cache of CPU and GPU runs, against independent references:
decoding from scratch (no cache), and the plain growing cache of tests/reference_cache.py. At
temperature 0 the sampler must give the same tokens, positions, forced flags, tag masks and blocks with
either cache, and the same log-probs (fp32), with its decode step captured (graphs.CpuGraph on a CPU, the
same capture code as on a GPU) or run eagerly; and the same rollouts whatever the row cap."""

import pytest
import torch

from conftest import tiny_model
from reference_cache import reference_cache
from test_sampler import TEXTS, biased, prompts_of
from nanopr1 import UsageError, kvcache
from nanopr1.attention import find_blocks
from nanopr1.format import PARALLEL, PATH, PATH_END, tag_ids
from nanopr1.graphs import VIEW, bucket
from nanopr1.kvcache import KVCache
from nanopr1.sampler import sample

MORE = TEXTS + ["Final Answer: 42", "Dogs and cats have four legs.", "First, compute", "x = 4"]


def cache_for(prompts, rows, new=60, graphs=True):
    return KVCache(rows, max(len(p) for p in prompts) + new + 1, "cpu", use_graphs=graphs)


def assert_same(a_list, b_list, tol=1e-5):
    for a, b in zip(a_list, b_list, strict=True):
        assert (a.ids, a.positions, a.forced, a.allowed, a.blocks, a.stop_reason) == \
               (b.ids, b.positions, b.forced, b.allowed, b.blocks, b.stop_reason)
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= tol


@torch.no_grad()
def test_forked_rows_match_decoding_from_scratch(bpe_tokenizer):
    """KV cloning: each path's per-token logits equal a no-cache forward of prefix + <Path> + path."""
    tok, model, t = bpe_tokenizer, tiny_model(bpe_tokenizer), tag_ids(bpe_tokenizer)
    prefix = prompts_of(tok)[0] + [t[PARALLEL]]
    paths = [[t[PATH]] + p + [t[PATH_END]] for p in prompts_of(tok, ["3 + 4 = 7", "Dogs have four legs.", "x"])]
    cache = KVCache(len(paths), len(prefix) + max(map(len, paths)), "cpu", use_graphs=True)
    cache.reset(model)
    cache.add_rows(len(paths))
    L = len(prefix)
    cache.prefill(model, torch.tensor([prefix]), torch.arange(L)[None], torch.ones(1, L, dtype=torch.bool), [0])
    for k in range(1, len(paths)):  # the fork: clone the prefix row
        cache.copy_row(0, k)
    got = [[] for _ in paths]
    for j in range(max(len(p) for p in paths)):  # all paths decoded together, finished ones not fed
        real = [j < len(p) for p in paths]
        ids = torch.tensor([[p[j] if j < len(p) else 0] for p in paths])
        logits = cache.step(model, ids, torch.full((len(paths), 1), len(prefix) + j), torch.tensor(real)[:, None])
        for k in range(len(paths)):
            if real[k]:
                got[k].append(logits[k].clone())
    assert len(cache.captured.graphs) == 1  # the steps were replays of one captured step
    for k, p in enumerate(paths):
        ref = model(input_ids=torch.tensor([prefix + p])).logits[0, len(prefix):]
        assert (torch.stack(got[k]) - ref).abs().max() <= 1e-4


CASES = [  # (name, bias, sample kwargs)
    ("parallel off", {}, dict(parallel=False)),
    ("seen, forced block", dict(par=3.0, path_end=2.0, summary_end=2.0), dict(variant="seen", force_block=3)),
    ("unseen, forced block", dict(par=3.0, path_end=2.0, summary_end=2.0), dict(variant="unseen", force_block=3)),
    ("unseen, 3 paths, path budget", dict(par=4.0, path_end=-5.0), dict(variant="unseen", num_paths=3,
                                                                       force_block=0, path_max_tokens=7)),
]


@pytest.mark.parametrize("graphs", [True, False])
@pytest.mark.parametrize("name, bias, kw", CASES, ids=[c[0] for c in CASES])
def test_the_cache_equals_the_reference_greedy(bpe_tokenizer, graphs, name, bias, kw):
    tok = bpe_tokenizer
    model = biased(tok, **bias) if bias else tiny_model(tok)
    kw = {"temperature": 0, "max_new_tokens": 60, **kw}
    prompts = prompts_of(tok)
    ref = sample(model, tok, prompts, 2, cache=reference_cache(), **kw)
    cache = cache_for(prompts, 32, graphs=graphs)
    assert_same(ref, sample(model, tok, prompts, 2, cache=cache, **kw))
    blocks = [find_blocks(r.ids, tag_ids(tok), cut=True) for r in ref]  # official rules: the last may be cut
    assert all(len(b) >= 1 for b in blocks) == ("force_block" in kw)
    assert (len(cache.captured.graphs) > 0) == graphs


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


@pytest.mark.parametrize("variant", ["seen", "unseen"])
def test_rows_that_finish_apart_are_freed_reused_and_compacted(bpe_tokenizer, monkeypatch, variant):
    tok = bpe_tokenizer
    model = StopAt(biased(tok, par=3.0, path_end=1.0, summary_end=1.0), tok.eos_token_id, 23)
    compactions = []
    original = KVCache.compact
    monkeypatch.setattr(KVCache, "compact", lambda self, keep: compactions.append(len(keep)) or original(self, keep))
    # reserve rules: under the official ones every rollout here ends at its 4th block, all at once
    prompts = prompts_of(tok, MORE)
    kw = dict(temperature=0, variant=variant, force_block=2, max_new_tokens=50, rules="reserve")
    ref = sample(model, tok, prompts, 2, cache=reference_cache(), **kw)
    assert_same(ref, sample(model, tok, prompts, 2, **kw))
    assert len({len(r.ids) for r in ref}) >= 3 and any(r.stop_reason == "eos" for r in ref)
    assert compactions and all(n < 14 for n in compactions)


def test_sampling_is_seeded(bpe_tokenizer):
    tok, model = bpe_tokenizer, biased(bpe_tokenizer, par=2.0, path_end=2.0, summary_end=2.0)
    run = lambda seed: sample(model, tok, prompts_of(tok), 2, max_new_tokens=40, seed=seed, variant="unseen")
    a, b, c = run(5), run(5), run(6)
    assert [r.ids for r in a] == [r.ids for r in b] and [r.ids for r in a] != [r.ids for r in c]


@torch.no_grad()
def test_dead_rows_never_disturb_live_ones(bpe_tokenizer):
    """A row padded into a bucket, or freed, writes only the scratch column: a live row's logits do not
    depend on how many dead rows share its step."""
    tok, model = bpe_tokenizer, tiny_model(bpe_tokenizer)
    p = prompts_of(tok)[0]
    ids, pos = torch.tensor([p]), torch.arange(len(p))[None]
    got = []
    for rows in (1, 5):  # one row alone (bucket 1) / with 4 free rows (bucket 8, 7 dead)
        cache = KVCache(rows, 40, "cpu", use_graphs=True)
        cache.reset(model)
        cache.add_rows(rows)
        cache.prefill(model, ids, pos, torch.ones(1, len(p), dtype=torch.bool), [0])
        out = []
        for j in range(5):
            real = torch.tensor([[True]] + [[False]] * (rows - 1))
            step_ids = torch.tensor([[7 + j]] + [[3]] * (rows - 1))
            step_pos = torch.tensor([[len(p) + j]] + [[0]] * (rows - 1))
            out.append(cache.step(model, step_ids, step_pos, real)[0].clone())
        got.append(torch.stack(out))
        assert cache.length == [len(p) + 5] + [0] * (rows - 1) and not cache.valid[1:].any()
    assert (got[0] - got[1]).abs().max() <= 1e-5


def test_a_cpu_decodes_eagerly_unless_the_stand_in_is_asked_for(bpe_tokenizer, monkeypatch):
    """The CPU stand-in only checks a GPU's rules, slower than eager decoding (1.13-1.3x on a real 135M
    model, and about 2 s of capture per new shape): a CPU cache decodes eagerly unless NANOPR1_CPU_GRAPHS=1
    (the tests' setting) or use_graphs=True asks for the stand-in. The same rollouts either way."""
    tok, model = bpe_tokenizer, tiny_model(bpe_tokenizer)
    prompts, got = prompts_of(tok), []
    for env, use in ((None, None), ("1", None), (None, True), ("1", False)):
        if env:
            monkeypatch.setenv("NANOPR1_CPU_GRAPHS", env)
        else:
            monkeypatch.delenv("NANOPR1_CPU_GRAPHS", raising=False)
        cache = cache_for(prompts, 8, new=20, graphs=use)
        got.append(sample(model, tok, prompts, 2, cache=cache, parallel=False, max_new_tokens=20, temperature=0))
        captured = cache.captured
        assert captured.enabled == (len(captured.graphs) > 0) == (env == "1" and use is None or use is True)
    for rollouts in got[1:]:
        assert_same(got[0], rollouts)


def test_buckets():
    assert [bucket(n) for n in (1, 2, 8, 9, 33, 64, 65, 256, 257, 600)] == [1, 8, 8, 32, 64, 64, 128, 256, 512, 768]
    assert VIEW == 256


@torch.no_grad()
def test_a_full_row_is_an_error_and_the_cache_never_moves(bpe_tokenizer):
    model = tiny_model(bpe_tokenizer)
    cache = KVCache(1, 4, "cpu")  # 4 columns: the prompt and one more token
    cache.reset(model)
    cache.add_rows(1)
    cache.prefill(model, torch.tensor([[5, 6, 7]]), torch.arange(3)[None], torch.ones(1, 3, dtype=torch.bool), [0])
    where = [t.data_ptr() for t in cache.tensors]
    cache.step(model, torch.tensor([[8]]), torch.tensor([[3]]), torch.tensor([[True]]))
    assert [t.data_ptr() for t in cache.tensors] == where  # written in place: allocated once, never grown
    with pytest.raises(RuntimeError, match="row full"):
        cache.step(model, torch.tensor([[9]]), torch.tensor([[4]]), torch.tensor([[True]]))


@torch.no_grad()
def test_the_model_must_use_the_cache(bpe_tokenizer):
    """If transformers stops passing our cache to the attention layers (a renamed keyword), the sampler
    fails loudly instead of decoding without a cache."""
    class DropsTheCache(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.config, self.generation_config = model, model.config, model.generation_config

        def forward(self, cache=None, attention_mask=None, **kw):  # (the mask's width is the cache's)
            return self.model(**kw)
    tok = bpe_tokenizer
    with pytest.raises(RuntimeError, match="ignored the KV cache"):
        sample(DropsTheCache(tiny_model(tok)), tok, prompts_of(tok)[:1], max_new_tokens=3, temperature=0,
               parallel=False)

# -----------------------------------------------------------------------------
# the row cap: same rollouts at temperature 0 whatever max_rows is, never more rows than max_rows


class CountRows:
    """Records the rows in use at every decode step."""

    def __init__(self, monkeypatch):
        self.seen = []
        step = KVCache.step
        monkeypatch.setattr(KVCache, "step", lambda cache, *a: self.seen.append(cache.n) or step(cache, *a))


CAP_CASES = [  # (name, bias, sample kwargs)
    ("parallel off", {}, dict(parallel=False)),
    ("seen blocks", dict(par=3.0, path_end=1.0, summary_end=1.0), dict(variant="seen", force_block=2)),
    ("unseen blocks", dict(par=3.0, path_end=1.0, summary_end=1.0), dict(variant="unseen", force_block=2)),
]


@pytest.mark.parametrize("name, bias, kw", CAP_CASES, ids=[c[0] for c in CAP_CASES])
def test_max_rows_gives_the_same_rollouts(bpe_tokenizer, monkeypatch, name, bias, kw):
    tok = bpe_tokenizer
    model = biased(tok, **bias) if bias else tiny_model(tok)
    prompts = prompts_of(tok) + prompts_of(tok, ["x = 4", "Dogs and cats have four legs."])
    count = CountRows(monkeypatch)
    runs = {}
    for cap in (2, 3, 5, None):
        count.seen = []
        runs[cap] = sample(model, tok, prompts, 2, max_new_tokens=40, temperature=0, max_rows=cap, **kw)
        assert count.seen and max(count.seen) <= (cap or 10 * 2)
    blocks = sum(len(r.blocks) for r in runs[None])
    assert (blocks > 0) == ("force_block" in kw)
    for cap in (2, 3, 5):
        assert_same(runs[None], runs[cap])


def test_fork_storm_completes_under_a_tight_cap(bpe_tokenizer, monkeypatch):
    """Every rollout opens blocks of 3 paths as soon as it can; 3 rows hold one rollout at a time."""
    tok = bpe_tokenizer
    model = biased(tok, par=50.0, path_end=6.0, summary_end=6.0)
    count = CountRows(monkeypatch)
    rollouts = sample(model, tok, prompts_of(tok), 4, num_paths=3, max_new_tokens=60, max_rows=3, seed=0,
                      variant="unseen")
    assert len(rollouts) == 12 and all(r.stop_reason in ("eos", "budget", "max_blocks") for r in rollouts)
    assert sum(len(r.blocks) for r in rollouts) >= 24  # official rules: a rollout the budget cut is malformed
    assert all(r.format_error is None or r.stop_reason == "budget" for r in rollouts)
    assert max(count.seen) == 3


def test_a_cap_below_one_rollout_is_refused(bpe_tokenizer):
    with pytest.raises(ValueError, match="max_rows=1: one rollout needs 2 rows"):
        sample(tiny_model(bpe_tokenizer), bpe_tokenizer, prompts_of(bpe_tokenizer), max_rows=1)


def test_a_cache_of_fewer_rows_than_a_rollout_is_one_line(bpe_tokenizer):
    """The --eval-every crash of a GPU run: a cache with fewer rows than num_paths (there derived from the
    free memory) admitted nothing and failed deep in the sampler; now a usage error naming the flags."""
    tok = bpe_tokenizer
    prompts = prompts_of(tok)
    with pytest.raises(UsageError, match=r"the KV cache has 1 rows of .* one rollout needs 2 \(--num-paths\): "
                                         r"raise --kv-memory-gb or --max-rows"):
        sample(tiny_model(tok), tok, prompts, 2, max_new_tokens=20, cache=cache_for(prompts, 1, new=20))


def test_rows_derived_from_free_memory_below_a_rollout_are_one_line(bpe_tokenizer, monkeypatch):
    """A GPU whose free memory holds one row (the run's own cache resident): the same error, before any work."""
    tok = bpe_tokenizer
    model = tiny_model(tok)
    row = kvcache.kv_bytes_per_token(model.config, torch.float32) * 100
    monkeypatch.setattr(kvcache, "free_bytes", lambda device: 1.5 * row)
    with pytest.raises(UsageError, match=r"GB of free GPU memory hold [01] KV cache rows .* one rollout needs 2"):
        sample(model, tok, prompts_of(tok), 2, max_new_tokens=60)


def test_a_cache_too_short_for_the_call_is_one_line(bpe_tokenizer):
    tok = bpe_tokenizer
    prompts = prompts_of(tok)
    with pytest.raises(UsageError, match="columns per row, this call needs"):
        sample(tiny_model(tok), tok, prompts, 2, max_new_tokens=60, cache=cache_for(prompts, 8, new=20))
