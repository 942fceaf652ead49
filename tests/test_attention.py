"""Tests for nanopr1/attention.py: block parsing, Multiverse positions, and the
Unseen masked forward against separate forwards of each path."""

import pytest
import torch

from conftest import tiny_model
from nanopr1.attention import BlockSpan, build_inputs, find_blocks, unseen_positions
from nanopr1.format import tag_ids

# a tiny alphabet of pseudo-token ids for structure tests: tags are strings, text is ints
TAGS = {"<Path>": 101, "</Path>": 102, "<Parallel>": 103, "</Parallel>": 104, "<Summary>": 105, "</Summary>": 106}
P, PE, PAR, PARE, S, SE = 101, 102, 103, 104, 105, 106


@pytest.mark.parametrize("ids, blocks", [
    ([1, 2, 3], []),
    ([1, PAR, P, 2, PE, P, 3, 4, PE, PARE, S, 5, SE, 6],
     [BlockSpan(1, [(2, 5), (5, 9)], (10, 13))]),
    ([PAR, P, PE, P, PE, PARE, S, SE], [BlockSpan(0, [(1, 3), (3, 5)], (6, 8))]),
    ([PAR, P, 1, PE, P, 2, PE, P, 3, PE, PARE, S, SE, 7, PAR, P, PE, P, PE, PARE, S, 9, SE],
     [BlockSpan(0, [(1, 4), (4, 7), (7, 10)], (11, 13)), BlockSpan(14, [(15, 17), (17, 19)], (20, 23))]),
    # the official layout: a newline (here 9) between </Parallel> and <Summary>
    ([1, PAR, P, 2, PE, P, 3, PE, PARE, 9, S, 5, SE, 6], [BlockSpan(1, [(2, 5), (5, 8)], (10, 13))]),
])
def test_find_blocks(ids, blocks):
    assert find_blocks(ids, TAGS) == blocks


@pytest.mark.parametrize("ids, reason", [
    ([1, PE, 2], "outside"),                                  # </Path> in main text
    ([1, S, 2, SE], "outside"),                               # a summary the runtime did not open
    ([PAR, 1, P, PE, PARE, S, SE], "not followed by a <Path>"),  # text between <Parallel> and <Path>
    ([PAR, P, 1], "never closed"),                            # unclosed path
    ([PAR, P, PAR, PE, PARE, S, SE], "inside"),               # nested block
    ([PAR, P, PE, 1, PARE, S, SE], "expected </Parallel>"),   # text between paths
    ([PAR, P, PE, PARE, 1, PE, S, SE], "not followed by <Summary>"),  # another tag before the summary
    ([PAR, P, PE, PARE, S, 1], "never closed"),               # unclosed summary
])
def test_find_blocks_rejects(ids, reason):
    with pytest.raises(ValueError, match=reason):
        find_blocks(ids, TAGS)


CUT = [  # (ids cut by the budget, the blocks find_blocks(cut=True) reads)
    ([1, PAR], [BlockSpan(1, [], None, True)]),
    ([PAR, P, 2], [BlockSpan(0, [(1, 3)], None, True)]),
    ([PAR, P, PE, P, 2], [BlockSpan(0, [(1, 3), (3, 5)], None, True)]),
    ([PAR, P, PE, P, PE, PARE, 9], [BlockSpan(0, [(1, 3), (3, 5)], None, True)]),
    ([PAR, P, PE, P, PE, PARE, 9, S, 4], [BlockSpan(0, [(1, 3), (3, 5)], (7, 9), True)]),
    ([PAR, P, PE, P, PE, PARE, S, SE, 5, PAR, P, 3],
     [BlockSpan(0, [(1, 3), (3, 5)], (6, 8)), BlockSpan(9, [(10, 12)], None, True)]),
]


@pytest.mark.parametrize("ids, blocks", CUT)
def test_a_block_cut_by_the_budget(ids, blocks):
    """cut=True (the trainer's reading) returns the cut last block; the format check still rejects it."""
    assert find_blocks(ids, TAGS, cut=True) == blocks
    with pytest.raises(ValueError):
        find_blocks(ids, TAGS)


@pytest.mark.parametrize("ids, reason", [
    ([PAR, P, PAR], "inside"), ([PAR, P, PE, 1], "expected </Parallel>"), ([PAR, 1], "not followed by a <Path>"),
    ([PAR, P, PE, PARE, 1, PE], "not followed by <Summary>"),
])
def test_a_cut_does_not_excuse_a_tag_out_of_place(ids, reason):
    with pytest.raises(ValueError, match=reason):
        find_blocks(ids, TAGS, cut=True)


def test_unseen_positions_multiverse_rule():
    ids = [1, PAR, P, 2, PE, P, 3, 4, PE, PARE, S, 5, SE, 6]
    pos = unseen_positions(10, len(ids), find_blocks(ids, TAGS))
    # prompt 0..9; main 10; <Parallel> 11; path 1 (3 tokens) 12..14; path 2 (4 tokens) 12..15;
    # </Parallel> at 11 + 4 + 1 = 16; then 17, 18, ...
    assert pos == [10, 11, 12, 13, 14, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    # the newline after </Parallel> (16) is numbered on: 17, then <Summary> 18 (as the official loop)
    ids = [1, PAR, P, 2, PE, P, 3, 4, PE, PARE, 9, S, 5, SE, 6]
    assert unseen_positions(10, len(ids), find_blocks(ids, TAGS)) == [10, 11, 12, 13, 14, 12, 13, 14, 15, 16, 17,
                                                                       18, 19, 20, 21]
    # a block cut in its second path, or right after its <Parallel>
    for ids, pos in [([1, PAR, P, 2, PE, P, 3, 4], [10, 11, 12, 13, 14, 12, 13, 14]), ([1, PAR], [10, 11])]:
        assert unseen_positions(10, len(ids), find_blocks(ids, TAGS, cut=True)) == pos


def _example(tok):
    """Two prompts of different lengths and two responses: one with two blocks, one without."""
    t = tag_ids(tok)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    par = lambda *paths: ([t["<Parallel>"]] + sum(([t["<Path>"]] + enc(p) + [t["</Path>"]] for p in paths), [])
                          + [t["</Parallel>"]] + enc("\n") + [t["<Summary>"]])
    r1 = (enc("Let x be 4.") + par("Dogs have four legs.", "3 + 4 = 7, then 14") + enc("Both agree")
          + [t["</Summary>"]] + enc("so") + par("x = 4", "cats", "2 + x = 6") + enc("19") + [t["</Summary>"]]
          + enc("Final Answer: 42"))
    r2 = enc("First, compute the number of apples.")
    return [enc("How many clips did she sell? <Path> in the prompt is text"), enc("Natalia")], [r1, r2], t


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_unseen_forward_equals_separate_path_forwards(bpe_tokenizer, arch):
    model = tiny_model(bpe_tokenizer, arch=arch)
    prompts, responses, t = _example(bpe_tokenizer)
    batch = build_inputs(prompts, responses, t, "unseen", pad_id=bpe_tokenizer.pad_token_id)
    assert batch["attention_mask"].shape == (2, 1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
    assert batch["attention_mask"].any(-1).all()  # no query row fully masked
    with torch.no_grad():
        logits = model(**batch).logits  # (B, T, V)
        prompt, response = prompts[0], responses[0]
        n, checked = len(prompt), 0
        for i, b in enumerate(find_blocks(response, t)):
            for s, e in b.paths:
                got = logits[0, n + s:n + e]
                # reference 1: the same response with the sibling paths deleted (no mask needed for them)
                alone = response[:b.paths[0][0]] + response[s:e] + response[b.paths[-1][1]:]
                ref = model(**build_inputs([prompt], [alone], t, "unseen", pad_id=0)).logits[0]
                k = n + b.paths[0][0]
                assert (got - ref[k:k + e - s]).abs().max() <= 1e-4
                if i == 0:  # reference 2, first block: prefix + this path alone, a plain causal forward
                    prefix = prompt + response[:b.parallel + 1]
                    ref = model(input_ids=torch.tensor([prefix + response[s:e]])).logits[0]
                    assert (got - ref[len(prefix):]).abs().max() <= 1e-4
                checked += e - s
        assert checked > 20
        # the prompt and the main text before the first block are plain causal
        first = find_blocks(response, t)[0].parallel + 1
        ids = torch.tensor([prompt + response[:first]])
        ref = model(input_ids=ids).logits[0]
        assert (logits[0, :n + first] - ref).abs().max() <= 1e-4
        # a response without blocks is plain causal (right padding changes nothing)
        ids = torch.tensor([prompts[1] + responses[1]])
        ref = model(input_ids=ids).logits[0]
        assert (logits[1, :ids.shape[1]] - ref).abs().max() <= 1e-4


def test_unseen_forward_of_a_response_cut_in_a_path(bpe_tokenizer):
    """The budget cut the response inside its last block's second path (official rules): that path's
    tokens get what they get with path 1 deleted, as the sampler decoded them in a row of their own."""
    model = tiny_model(bpe_tokenizer)
    prompts, responses, t = _example(bpe_tokenizer)
    prompt, b = prompts[0], find_blocks(responses[0], t)[-1]
    (s1, e1), (s2, e2) = b.paths[:2]
    response = responses[0][:s2 + 3]  # its <Path> and two tokens
    alone = response[:s1] + response[s2:]
    with torch.no_grad():
        got = model(**build_inputs([prompt], [response], t, "unseen", pad_id=0)).logits[0, len(prompt) + s2:]
        ref = model(**build_inputs([prompt], [alone], t, "unseen", pad_id=0)).logits[0, len(prompt) + s1:]
    assert got.shape[0] == 3 and (got - ref).abs().max() <= 1e-4


def test_unseen_sibling_paths_are_hidden(bpe_tokenizer):
    prompts, responses, t = _example(bpe_tokenizer)
    batch = build_inputs(prompts, responses, t, "unseen", pad_id=0)
    mask, n = batch["attention_mask"][0, 0], len(prompts[0])
    b = find_blocks(responses[0], t)[0]
    (s1, e1), (s2, e2) = b.paths
    assert not mask[n + s2:n + e2, n + s1:n + e1].any()   # path 2 never sees path 1
    assert mask[n + s2:n + e2, :n + b.parallel + 1].all()  # ... but sees the whole prefix
    after = b.paths[-1][1]                                  # </Parallel> and the newline see both paths
    assert mask[n + after:n + b.summary[0], n + s1:n + e2].all() and b.summary[0] - after == 2
    assert batch["position_ids"][0, n + s1] == batch["position_ids"][0, n + s2]


def test_seen_is_plain_causal(bpe_tokenizer):
    model = tiny_model(bpe_tokenizer)
    prompts, responses, t = _example(bpe_tokenizer)
    batch = build_inputs(prompts, responses, t, "seen", pad_id=bpe_tokenizer.pad_token_id)
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    with torch.no_grad():
        logits = model(**batch).logits
        for b in range(2):
            ids = torch.tensor([prompts[b] + responses[b]])
            ref = model(input_ids=ids).logits[0]
            assert (logits[b, :ids.shape[1]] - ref).abs().max() <= 1e-4


def test_build_inputs_rejects_malformed_and_unknown_variant(bpe_tokenizer):
    t = tag_ids(bpe_tokenizer)
    with pytest.raises(ValueError, match="outside"):
        build_inputs([[1, 2]], [[3, t["</Path>"]]], t, "unseen", pad_id=0)
    with pytest.raises(ValueError, match="variant"):
        build_inputs([[1, 2]], [[3]], t, "both", pad_id=0)
