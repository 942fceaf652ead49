"""Tests for nanopr1/metrics.py: hand-built rollouts with known layouts, every metric against
its closed-form value; sums from two batches add up to the sums of both."""

import pytest

from nanopr1.format import PARALLEL, PARALLEL_END, PATH, PATH_END, SUMMARY, SUMMARY_END, tag_ids
from nanopr1.metrics import from_sums, rollout_metrics, means, sums
from nanopr1.rollout import make_rollout

# text tokens are small ids (byte-level pieces of the test BPE): never a tag, never EOS (id 0)


def block(paths, summary):
    """A block as a layout item: ([path contents], summary content), tags added by `response`."""
    return (paths, summary)


def response(tok, *items):
    """Response ids from text lists and blocks."""
    t, ids = tag_ids(tok), []
    for item in items:
        if isinstance(item, tuple):
            paths, summary = item
            ids += [t[PARALLEL]] + sum(([t[PATH]] + p + [t[PATH_END]] for p in paths), [])
            ids += [t[PARALLEL_END], t[SUMMARY]] + summary + [t[SUMMARY_END]]
        else:
            ids += item
    return ids


def rollout(tok, *items, eos=False):
    ids = response(tok, *items) + ([tok.eos_token_id] if eos else [])
    return make_rollout(tok, [10, 11], ids, "eos" if eos else "budget")


# name: (layout, eos, expected metrics); n = response length, path lengths count their two tags
CASES = {
    "no block": (([10, 11, 12, 13],), False,  # n = 4
                 dict(num_blocks=0, first_block_pos=None, num_paths=0, path_tokens=0, summary_tokens=0,
                      path_share=0.0, critical_path=4, latency_ratio=1.0, path_diversity=[])),
    # 10 11 | <P> <p>20 21 22</p> <p>20 21</p> </P> <S>30</S> | 12: n = 17, paths 5 and 4;
    # bigrams {<p>20, 20 21, 21 22, 22</p>} vs {<p>20, 20 21, 21</p>}: overlap 2/5
    "one block, unequal paths": (([10, 11], block([[20, 21, 22], [20, 21]], [30]), [12]), False,
                                 dict(num_blocks=1, first_block_pos=2 / 17, num_paths=2, path_tokens=9,
                                      summary_tokens=3, path_share=9 / 17, critical_path=17 - (9 - 5),
                                      latency_ratio=17 / 13, path_diversity=[1 - 2 / 5])),
    # 10 | A: paths 3, 3, summary 2 | 11 | B: paths 4, 4, 3, summary 4: n = 1 + 10 + 1 + 17 = 29;
    # B: paths 1 and 2 equal (overlap 1), path 3 shares nothing: 1 - (1 + 0 + 0) / 3
    "two blocks, one of 3 paths": (([10], block([[40], [41]], []), [11],
                                    block([[50, 51], [50, 51], [52]], [53, 54])), False,
                                   dict(num_blocks=2, first_block_pos=1 / 29, num_paths=5, path_tokens=17,
                                        summary_tokens=6, path_share=17 / 29, critical_path=29 - (6 - 3) - (11 - 4),
                                        latency_ratio=29 / 19, path_diversity=[1.0, 2 / 3])),
    "identical paths": ((block([[20, 21, 22], [20, 21, 22]], [30]),), False,  # n = 15, first block at 0
                        dict(num_blocks=1, first_block_pos=0.0, num_paths=2, path_tokens=10, summary_tokens=3,
                             path_share=10 / 15, critical_path=10, latency_ratio=1.5, path_diversity=[0.0])),
    "empty paths are identical": ((block([[], []], []),), False,  # n = 8: only tags
                                  dict(num_blocks=1, first_block_pos=0.0, num_paths=2, path_tokens=4,
                                       summary_tokens=2, path_share=0.5, critical_path=6, latency_ratio=8 / 6,
                                       path_diversity=[0.0])),
    # the same tokens in another order share no bigram
    "disjoint paths": (([10], block([[20, 21], [21, 20]], [30]), [11]), False,  # n = 1 + 1 + 8 + 1 + 3 + 1 = 15
                       dict(num_blocks=1, first_block_pos=1 / 15, num_paths=2, path_tokens=8, summary_tokens=3,
                            path_share=8 / 15, critical_path=11, latency_ratio=15 / 11, path_diversity=[1.0])),
    # EOS counts in n: 10 11 | <P> <p>20</p> <p>21 22</p> </P> <S>30</S> | EOS: n = 2 + 12 + 1 = 15
    "ends with EOS": (([10, 11], block([[20], [21, 22]], [30])), True,
                      dict(num_blocks=1, first_block_pos=2 / 15, num_paths=2, path_tokens=7, summary_tokens=3,
                           path_share=7 / 15, critical_path=12, latency_ratio=15 / 12, path_diversity=[1.0])),
}


@pytest.mark.parametrize("name", CASES)
def test_rollout_metrics(bpe_tokenizer, name):
    layout, eos, want = CASES[name]
    r = rollout(bpe_tokenizer, *layout, eos=eos)
    assert r.format_error is None
    got = rollout_metrics(r)
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k] == (v if v is None or isinstance(v, int) else pytest.approx(v, abs=1e-12)), k


def test_malformed_rollout_counts_as_no_block(bpe_tokenizer):
    t = tag_ids(bpe_tokenizer)  # a block with one path: make_rollout leaves `blocks` empty
    r = make_rollout(bpe_tokenizer, [10], [10, t[PARALLEL], t[PATH], 20, t[PATH_END], t[PARALLEL_END],
                                           t[SUMMARY], t[SUMMARY_END]], "budget")
    assert r.format_error is not None
    m = rollout_metrics(r)
    assert (m["num_blocks"], m["first_block_pos"], m["critical_path"], m["latency_ratio"]) == (0, None, 8, 1.0)


def test_summarize_and_sums(bpe_tokenizer):
    a = rollout(bpe_tokenizer, *CASES["one block, unequal paths"][0])  # n 17, paths 5 4, critical 13
    b = rollout(bpe_tokenizer, *CASES["two blocks, one of 3 paths"][0])  # n 29, paths 3 3 4 4 3, critical 19
    c = rollout(bpe_tokenizer, *CASES["no block"][0])  # n 4, critical 4
    want = dict(blocks_per_rollout=3 / 3, first_block_pos=(2 / 17 + 1 / 29) / 2, path_len=26 / 7,
                summary_len=9 / 3, path_share=26 / 50, critical_path=36 / 3, latency_ratio=50 / 36,
                path_diversity=(3 / 5 + 1 + 2 / 3) / 3)
    got = means([a, b, c])
    assert got == pytest.approx(want, abs=1e-12)
    # what train_rl.py does across ranks: add the sums of each rank, divide once
    added = {k: v + sums([b, c])[k] for k, v in sums([a]).items()}
    assert added == sums([a, b, c])
    assert from_sums(added) == got


def test_summarize_without_blocks(bpe_tokenizer):
    a = rollout(bpe_tokenizer, [10, 11, 12])
    b = rollout(bpe_tokenizer, [10], eos=True)  # n = 2 with EOS
    assert means([a, b]) == dict(blocks_per_rollout=0.0, first_block_pos=None, path_len=None, summary_len=None,
                                     path_share=0.0, critical_path=2.5, latency_ratio=1.0, path_diversity=None)
    assert list(sums([])) == list(sums([a, b]))  # same keys, same order on every rank
    assert set(means([]).values()) == {None}
