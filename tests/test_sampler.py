"""Tests for nanopr1/sampler.py: greedy == generate, sampled paths == decoding from
scratch, sampler == scorer (both variants, both rules), seeds, out-of-place tags, budgets (both rules).
The caches themselves (KV cloning, compaction, the fast path) are in test_kvcache.py."""

import pytest
import torch

from conftest import tiny_model
from nanopr1.attention import BlockSpan, build_inputs, find_blocks, parse_blocks
from nanopr1.format import PARALLEL, PARALLEL_END, PATH, PATH_END, SUMMARY, SUMMARY_END, gap_ids, tag_ids
from nanopr1.rollout import ALL_TAGS, BIT, apply_tag_mask, tree
from nanopr1.sampler import gumbel, mix, sample

TEXTS = ["How many clips did she sell altogether in April?", "Natalia", "Let x be the number of cats. Then"]


class Biased(torch.nn.Module):
    """A model wrapper that adds a constant to some logits: makes a random model open blocks,
    close paths, or insist on out-of-place tags. The sampler and the scorer both see it."""

    def __init__(self, model, bias):
        super().__init__()
        self.model, self.config, self.generation_config = model, model.config, model.generation_config
        self.idx, self.val = torch.tensor(list(bias)), torch.tensor(list(bias.values()))

    def forward(self, **kw):
        out = self.model(**kw)
        out.logits[..., self.idx] += self.val
        return out


def prompts_of(tok, texts=TEXTS):
    return [tok(s, add_special_tokens=False)["input_ids"] for s in texts]


def biased(tok, arch="qwen3", **bias):
    t = tag_ids(tok)
    names = {"par": PARALLEL, "path": PATH, "path_end": PATH_END, "par_end": PARALLEL_END,
             "summary": SUMMARY, "summary_end": SUMMARY_END}
    special = {"eos": tok.eos_token_id, "im_end": tok.convert_tokens_to_ids("<|im_end|>")}
    return Biased(tiny_model(tok, arch=arch), {special[k] if k in special else t[names[k]]: v for k, v in bias.items()})


def score(model, rollouts, tags, variant, temperature=1.0):
    """The trainer's view: one full forward of prompt+response, tag mask applied. (B, T) log-probs."""
    batch = build_inputs([r.prompt_ids for r in rollouts], [r.ids for r in rollouts], tags, variant, pad_id=0)
    with torch.no_grad():
        logits = model(**batch).logits
    out = []
    for b, r in enumerate(rollouts):
        P, n = len(r.prompt_ids), len(r.ids)
        masked = apply_tag_mask(logits[b, P - 1:P + n - 1], torch.tensor(r.allowed), tags)
        logp = torch.log_softmax(masked / temperature, -1).gather(1, torch.tensor(r.ids)[:, None])[:, 0]
        out.append((logp, batch["position_ids"][b, P:P + n].tolist()))
    return out

# -----------------------------------------------------------------------------
# equivalence with references


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_greedy_parallel_off_matches_generate(bpe_tokenizer, arch):
    tok, model = bpe_tokenizer, tiny_model(bpe_tokenizer, arch=arch)
    prompts = prompts_of(tok)
    rollouts = sample(model, tok, prompts, max_new_tokens=30, temperature=0, parallel=False)
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (P - len(p)) + p for p in prompts])
    mask = (ids != tok.pad_token_id).long()
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=30,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[:, P:].tolist()
    assert [r.ids for r in rollouts] == [g[:len(r.ids)] for r, g in zip(rollouts, ref)]
    assert all(len(r.ids) == 30 and r.stop_reason == "budget" for r in rollouts)


@pytest.mark.parametrize("variant, num_paths, top_p", [("seen", 2, 1.0), ("unseen", 2, 1.0), ("unseen", 3, 0.9),
                                                        ("seen", 3, 0.9)])
@pytest.mark.parametrize("rules", ["official", "reserve"])
def test_sampler_equals_scorer(bpe_tokenizer, variant, num_paths, top_p, rules):
    """The trainer's log-probs of every sampled token equal the sampler's (Seen: but for later paths),
    official rules included: rollouts that end at the block limit, and responses the budget cut
    mid-block (their last block's paths read with find_blocks(cut=True), as build_inputs does)."""
    tok, t = bpe_tokenizer, tag_ids(bpe_tokenizer)
    model = biased(tok, par=4.0, path_end=3.0, summary_end=3.0, eos=1.0)
    rollouts = sample(model, tok, prompts_of(tok), 4, num_paths=num_paths, max_new_tokens=90, seed=1,
                      variant=variant, top_p=top_p, rules=rules, max_blocks=1 if rules == "official" else 4)
    blocks = [find_blocks(r.ids, t, cut=True) for r in rollouts]
    assert sum(len(b) for b in blocks) >= 8
    if rules == "reserve":
        assert all(parse_blocks(r.ids, t)[1] is None for r in rollouts) and any(len(b) >= 2 for b in blocks)
    else:  # some end at the block limit, some are cut in a later path: every kind is checked below
        assert any(r.stop_reason == "max_blocks" for r in rollouts)
        assert any(b and b[-1].cut and len(b[-1].paths) >= 2 for b in blocks)
        assert all(r.format_error is None or r.stop_reason == "budget" for r in rollouts)
    later = 0
    for r, bl, (logp, positions) in zip(rollouts, blocks, score(model, rollouts, t, variant)):
        assert positions == r.positions
        skip = {i for b in bl for s, e in b.paths[1:] for i in range(s, e)} if variant == "seen" else set()
        sampled = [i for i in range(len(r.ids)) if not r.forced[i]]
        diff = torch.tensor([logp[i].item() - r.logprobs[i] for i in sampled if i not in skip]).abs()
        assert diff.max() <= 1e-4
        later += sum(abs(logp[i].item() - r.logprobs[i]) > 1e-3 for i in sampled if i in skip)
    assert (later > 0) == (variant == "seen")  # seen: paths after the first did not see path 1 when sampled


@pytest.mark.parametrize("variant", ["seen", "unseen"])
def test_sampled_paths_match_decoding_from_scratch(bpe_tokenizer, variant):
    """Every sampled path token's log-prob equals a no-cache forward of prefix + that path alone
    (official rules: a path the budget cut too)."""
    tok, t = bpe_tokenizer, tag_ids(bpe_tokenizer)
    model = biased(tok, path_end=2.0)
    rollouts = sample(model, tok, prompts_of(tok), 2, max_new_tokens=60, seed=3, variant=variant, force_block=2)
    checked = 0
    for r in rollouts:
        b = find_blocks(r.ids, t, cut=True)[0]
        prefix = r.prompt_ids + r.ids[:b.parallel + 1]
        for s, e in b.paths:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prefix + r.ids[s:e]])).logits[0, len(prefix) - 1:-1]
            logp = torch.log_softmax(apply_tag_mask(logits, torch.tensor(r.allowed[s:e]), t), -1)
            for j in range(e - s):
                if not r.forced[s + j]:
                    assert abs(logp[j, r.ids[s + j]].item() - r.logprobs[s + j]) <= 1e-4
                    checked += 1
    assert checked > 10


def test_seeds(bpe_tokenizer):
    tok, model = bpe_tokenizer, biased(bpe_tokenizer, par=2.0, path_end=2.0, summary_end=2.0)
    run = lambda seed: sample(model, tok, prompts_of(tok)[:2], 3, max_new_tokens=40, seed=seed, variant="unseen")
    a, b, c = run(7), run(7), run(8)
    assert [r.ids for r in a] == [r.ids for r in b] and [r.logprobs for r in a] == [r.logprobs for r in b]
    assert [r.ids for r in a] != [r.ids for r in c]
    for g in range(2):  # the rows of one group differ at temperature 1
        group = [tuple(r.ids) for r in a[3 * g:3 * g + 3]]
        assert len(set(group)) == 3

def test_gumbel_noise_samples_the_softmax():
    """argmax(log p + noise) over 40,000 keys: each token's frequency within 4 standard errors of p."""
    p = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    n = 40_000
    keys = torch.tensor([mix(123, k) for k in range(n)])
    tok = (p.log() + gumbel(keys, len(p))).argmax(-1)
    freq = torch.bincount(tok, minlength=len(p)).float() / n
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt()).all(), freq
    assert not torch.equal(gumbel(keys[:3], 5), gumbel(keys[3:6], 5))


def test_every_draw_of_a_rollout_has_its_own_noise(bpe_tokenizer, monkeypatch):
    """The noise key of each sampled token is new within its rollout: paths of a second block at the same
    index as the first block's paths, the main line after a block, all draw fresh noise."""
    import nanopr1.sampler
    tok, seen = bpe_tokenizer, []
    real = nanopr1.sampler.gumbel
    monkeypatch.setattr(nanopr1.sampler, "gumbel", lambda keys, V: seen.append(keys.tolist()) or real(keys, V))
    model = biased(tok, par=6.0, path_end=6.0, summary_end=6.0)
    ros = sample(model, tok, prompts_of(tok)[:1], 1, max_new_tokens=80, seed=3, variant="unseen")
    assert len(ros[0].blocks) >= 2
    keys = [k for step in seen for k in step if k != 0]  # one rollout: every row's key at every step
    assert len(keys) == len(set(keys)) and len(keys) >= sum(not f for f in ros[0].forced)


def test_a_rollout_does_not_depend_on_its_batch(bpe_tokenizer):
    """Sampling noise is a hash of (prompt seed, rollout, path, token index): at temperature 1 a prompt
    gives the same rollouts alone, with other prompts, or under any row cap."""
    tok = bpe_tokenizer
    model = biased(tok, par=3.0, path_end=2.0, summary_end=2.0)
    prompts, seeds = prompts_of(tok), [11, 22, 33]
    kw = dict(max_new_tokens=50, variant="unseen", top_p=0.9)
    together = sample(model, tok, prompts, 3, seed=seeds, **kw)
    capped = sample(model, tok, prompts, 3, seed=seeds, max_rows=4, **kw)
    alone = sample(model, tok, prompts[2:], 3, seed=seeds[2:], **kw)
    assert sum(len(find_blocks(r.ids, tag_ids(tok), cut=True)) for r in together) >= 3
    assert [r.ids for r in together] == [r.ids for r in capped]
    assert [r.ids for r in together[6:]] == [r.ids for r in alone]


# -----------------------------------------------------------------------------
# out-of-place tags and budgets


def _structure(r, tags):
    """The tags of a rollout as (name, forced) pairs."""
    name = {v: k for k, v in tags.items()}
    return [(name[i], f) for i, f in zip(r.ids, r.forced) if i in name]


def _every_open_tag_forced(r, t):
    return all(f for n, f in _structure(r, t) if n in (PATH, PARALLEL_END, SUMMARY))


OUT_OF_PLACE = [
    # (case, bias, sample kwargs, check(rollout, tags, tokenizer))
    ("</Path> in main text is never sampled", dict(path_end=50.0), dict(force_block=3),
     lambda r, t, tok: r.blocks and all((e - s) == 2 for b in r.blocks for s, e in b.paths)
     and _structure(r, t).count((PATH_END, False)) == 2 * len(r.blocks)),
    ("<Summary> only where the runtime puts it", dict(summary=50.0, par=-50.0), dict(force_block=2),
     lambda r, t, tok: [x for x in _structure(r, t) if x[0] == SUMMARY] == [(SUMMARY, True)]),
    ("<Path> and </Parallel> are never sampled", dict(path=50.0, par_end=50.0), dict(force_block=0),
     lambda r, t, tok: _every_open_tag_forced(r, t) and r.ids[0] == t[PARALLEL] and r.forced[0]),
    ("<Parallel> never inside a path", dict(par=50.0, path_end=-50.0), dict(path_max_tokens=6, max_blocks=1),
     lambda r, t, tok: len(r.blocks) == 1 and all(t[PARALLEL] not in r.ids[s:e] for s, e in r.blocks[0].paths)),
    ("block limit respected, the answer still written", dict(par=50.0, path_end=5.0, summary_end=5.0),
     dict(max_blocks=2, max_new_tokens=80), lambda r, t, tok: len(r.blocks) == 2 and len(r.ids) - r.blocks[-1].summary[1] >= 5),
    ("EOS inside a path or summary closes it", dict(eos=50.0), dict(force_block=0),
     lambda r, t, tok: r.ids == [t[PARALLEL], t[PATH], t[PATH_END], t[PATH], t[PATH_END], t[PARALLEL_END],
                                 *gap_ids(tok), t[SUMMARY], t[SUMMARY_END], tok.eos_token_id]
     and r.forced == [True] * 9 + [False] and r.stop_reason == "eos"),
    ("a path that never closes is closed at its budget", dict(path_end=-50.0, eos=-50.0),
     dict(force_block=1, path_max_tokens=7),
     lambda r, t, tok: all(e - s == 7 and r.forced[e - 1] for s, e in r.blocks[0].paths)),
    ("a summary that never closes is closed reserve // 2 tokens before the budget", dict(summary_end=-50.0, eos=-50.0),
     dict(force_block=1, path_max_tokens=5, reserve=6),
     lambda r, t, tok: len(r.ids) == 40 and r.ids[36] == t[SUMMARY_END] and r.forced[36] and r.stop_reason == "budget"),
    ("without a reserve the summary may take the budget's last token", dict(summary_end=-50.0, eos=-50.0),
     dict(force_block=1, path_max_tokens=5, reserve=0),
     lambda r, t, tok: len(r.ids) == 40 and r.ids[-1] == t[SUMMARY_END] and r.forced[-1] and r.stop_reason == "budget"),
]


@pytest.mark.parametrize("case, bias, kw, check", OUT_OF_PLACE, ids=[c[0] for c in OUT_OF_PLACE])
@pytest.mark.parametrize("variant", ["seen", "unseen"])
def test_out_of_place(bpe_tokenizer, case, bias, kw, check, variant):
    """Under the reserve rules, where every block closes (official rules: below)."""
    tok, t = bpe_tokenizer, tag_ids(bpe_tokenizer)
    rollouts = sample(biased(tok, **bias), tok, prompts_of(tok)[:2], 2, seed=0, variant=variant,
                      **{"max_new_tokens": 40, "rules": "reserve", **kw})
    for r in rollouts:
        assert parse_blocks(r.ids, t)[1] is None, (case, r.text)
        assert check(r, t, tok), (case, _structure(r, t))


@pytest.mark.parametrize("parallel", [True, False])
def test_the_chat_templates_end_of_turn_stops_a_rollout(bpe_tokenizer, parallel):
    """A Qwen-like tokenizer: EOS is <|endoftext|>, the template ends a turn with <|im_end|> (Qwen3-4B-Base).
    A rollout that closes its turn stops there; the token is not part of its text."""
    tok = bpe_tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|endoftext|>" and im_end != tok.eos_token_id
    rollouts = sample(biased(tok, im_end=6.0), tok, prompts_of(tok), 3, max_new_tokens=60, seed=0, parallel=parallel)
    assert all(r.stop_reason == "eos" and r.ids[-1] == im_end and im_end not in r.ids[:-1] for r in rollouts)
    assert all("<|im_end|>" not in r.text for r in rollouts)


def test_an_answer_next_to_a_special_token_is_read(bpe_tokenizer):
    """Main-line text is read without special tokens: `42<|im_end|>` and `42 <|endoftext|>` are 42."""
    from nanopr1.rewards import reward_rollout
    from nanopr1.rollout import make_rollout
    tok = bpe_tokenizer
    for text in ("Final Answer: 42<|im_end|>", "Final Answer: 42 <|endoftext|>", "Final Answer: 42<|im_end|>\nmore"):
        r = make_rollout(tok, [5], tok(text, add_special_tokens=False)["input_ids"], "budget")
        assert reward_rollout(r, "42")[1]["correct"], text


def test_parallel_off_tags_are_text(bpe_tokenizer):
    tok, t = bpe_tokenizer, tag_ids(bpe_tokenizer)
    rollouts = sample(biased(tok, path_end=8.0), tok, prompts_of(tok), 2, max_new_tokens=20, seed=0, parallel=False)
    assert all(a == ALL_TAGS for r in rollouts for a in r.allowed)
    assert any((PATH_END, False) in _structure(r, t) for r in rollouts)
    assert all(r.blocks == [] and r.stop_reason == "budget" and len(r.ids) == 20 for r in rollouts)


@pytest.mark.parametrize("max_new, path_max, num_paths", [(12, None, 2), (20, None, 3), (40, 6, 2), (64, 9, 3),
                                                          (64, None, 2), (8, None, 2), (300, 2, 4)])
@pytest.mark.parametrize("variant", ["seen", "unseen"])
def test_budgets(bpe_tokenizer, max_new, path_max, num_paths, variant):
    """Reserve rules. Nothing ever closes by itself: every limit is reached, and every closing still fits."""
    tok = bpe_tokenizer
    model = biased(tok, par=50.0, path_end=-50.0, summary_end=-50.0, eos=-50.0)
    rollouts = sample(model, tok, prompts_of(tok)[:2], 2, num_paths=num_paths, max_new_tokens=max_new,
                      path_max_tokens=path_max, variant=variant, seed=0, rules="reserve")
    for r in rollouts:
        assert r.format_error is None and len(r.ids) == max_new and r.stop_reason == "budget"
        assert len(r.ids) == len(r.forced) == len(r.logprobs) == len(r.positions) == len(r.allowed)
        assert all(len(b.paths) == num_paths for b in r.blocks)
        reserve = min(64, max_new // 8)  # the default: kept for the summary and the answer
        closing = 3 + len(gap_ids(tok))  # </Parallel>, the newline, <Summary>, </Summary>
        assert len(r.blocks) <= 4 and (len(r.blocks) > 0) == ((max_new - 1 - closing - reserve) // num_paths >= 3)
        for b in r.blocks:
            assert len({e - s for s, e in b.paths}) == 1  # all paths ran to the same limit
            assert path_max is None or b.paths[0][1] - b.paths[0][0] == path_max
        # a forced token has log-prob 0; the tags are sampled only where allowed
        assert all(lp == 0.0 for lp, f in zip(r.logprobs, r.forced) if f)
        assert all(a & BIT[PARALLEL] for i, a, f in zip(r.ids, r.allowed, r.forced) if i == tag_ids(tok)[PARALLEL] and not f)


@pytest.mark.parametrize("variant", ["seen", "unseen"])
def test_a_block_opened_anywhere_leaves_room_for_the_answer(bpe_tokenizer, variant):
    """Paths and summary that never close by themselves, a block forced at every response index 0..budget:
    whenever the block opens, at least reserve // 2 tokens are left after its summary, enough for the
    final line; with reserve 0 a late block can eat the budget."""
    tok = bpe_tokenizer
    answer = len(tok("\nFinal Answer: 42", add_special_tokens=False)["input_ids"])
    model = biased(tok, path_end=-50.0, summary_end=-50.0, eos=-50.0, im_end=-50.0)
    budget, reserve = 48, 2 * answer
    opened, starved = 0, 0
    for k in range(budget + 1):
        for r in sample(model, tok, prompts_of(tok)[:1], max_new_tokens=budget, reserve=reserve, force_block=k,
                        max_blocks=1, variant=variant, seed=k, rules="reserve"):
            assert len(r.ids) == budget and r.format_error is None
            if r.blocks:
                opened += 1
                assert len(r.ids) - r.blocks[0].summary[1] >= reserve // 2 >= answer
        r = sample(model, tok, prompts_of(tok)[:1], max_new_tokens=budget, reserve=0, force_block=k, max_blocks=1,
                   variant=variant, seed=k, rules="reserve")[0]
        starved += bool(r.blocks) and len(r.ids) - r.blocks[0].summary[1] < answer
    assert opened >= budget // 2  # every early opening point was tried
    assert starved > 0  # without the reserve some block leaves no room: the test can tell


# -----------------------------------------------------------------------------
# official rules (verl parallel_thinking_loop_v3.py): the path cap, the block limit, the budget's cut


def _paths(r, tags):
    return [r.ids[s:e] for s, e in find_blocks(r.ids, tags, cut=True)[0].paths]


@pytest.mark.parametrize("variant", ["seen", "unseen"])
def test_official_a_path_is_cut_at_path_max_tokens_and_closed(bpe_tokenizer, variant):
    """Paths that never close: each keeps the first path_max_tokens tokens it writes after its <Path>
    (its tags not counted), then </Path> is forced (official: ids[:max_len] + </Path>); then the
    runtime writes </Parallel>, the newline, <Summary>, all forced."""
    tok, t = bpe_tokenizer, tag_ids(bpe_tokenizer)
    model = biased(tok, par=-50.0, path_end=-50.0, eos=-50.0, im_end=-50.0, summary_end=50.0)
    run = lambda cap: sample(model, tok, prompts_of(tok)[:2], 2, max_new_tokens=80, force_block=1, seed=4,
                             path_max_tokens=cap, variant=variant)
    for r, longer in zip(run(7), run(20)):
        b = r.blocks[0]
        assert r.format_error is None and [e - s for s, e in b.paths] == [9, 9]
        for s, e in b.paths:
            assert r.forced[s:e] == [True] + [False] * 7 + [True] and r.ids[e - 1] == t[PATH_END]
        # the cut keeps what the path wrote first: the same tokens as a path allowed 20
        assert [p[:8] for p in _paths(r, t)] == [p[:8] for p in _paths(longer, t)] and len(_paths(longer, t)[0]) == 22
        gap = r.ids[b.paths[-1][1]:b.summary[0] + 1]
        assert gap == [t[PARALLEL_END], *gap_ids(tok), t[SUMMARY]] and all(r.forced[b.paths[-1][1]:b.summary[0] + 1])
        assert r.ids[b.summary[0] + 1] == t[SUMMARY_END] and not r.forced[b.summary[0] + 1]  # sampled


@pytest.mark.parametrize("variant", ["seen", "unseen"])
def test_official_a_rollout_ends_with_its_max_blocks_th_block(bpe_tokenizer, variant):
    """Blocks wanted everywhere: the rollout ends right after the </Summary> of its 4th block (official
    max_iterations_for_parallel_thinking=4), no EOS; under the reserve rules it goes on after it."""
    tok, t = bpe_tokenizer, tag_ids(bpe_tokenizer)
    model = biased(tok, par=50.0, path_end=5.0, summary_end=5.0, eos=-50.0, im_end=-50.0)
    for rules in ("official", "reserve"):
        for r in sample(model, tok, prompts_of(tok), 2, max_new_tokens=200, seed=2, variant=variant, rules=rules):
            assert r.format_error is None and len(r.blocks) == 4
            ended = r.ids[-1] == t[SUMMARY_END] and r.blocks[-1].summary[1] == len(r.ids)
            assert (r.stop_reason, ended) == (("max_blocks", True) if rules == "official" else ("budget", False))


@pytest.mark.parametrize("num_paths", [2, 3])
@pytest.mark.parametrize("variant", ["seen", "unseen"])
def test_official_the_budget_cuts_a_block(bpe_tokenizer, variant, num_paths):
    """Nothing closes: a block opens at once and its paths are written side by side; the response is cut
    at max_new_tokens (official: the assembled response_ids[:response_length]), which here falls in path 1,
    so no later path is kept. The rollout is malformed for the format check, its cut block readable."""
    tok, t = bpe_tokenizer, tag_ids(bpe_tokenizer)
    model = biased(tok, par=50.0, path_end=-50.0, summary_end=-50.0, eos=-50.0, im_end=-50.0)
    for r in sample(model, tok, prompts_of(tok)[:2], 2, num_paths=num_paths, max_new_tokens=40, seed=0,
                    variant=variant):
        assert len(r.ids) == 40 and r.stop_reason == "budget" and r.format_error is not None
        assert len(r.ids) == len(r.forced) == len(r.logprobs) == len(r.positions) == len(r.allowed)
        assert find_blocks(r.ids, t, cut=True) == [BlockSpan(0, [(1, 40)], None, True)]
        assert r.forced[:2] == [False, True] and not any(r.forced[2:])


@pytest.mark.parametrize("variant", ["seen", "unseen"])
def test_official_a_summary_runs_until_the_budget_cuts_it(bpe_tokenizer, variant):
    """A summary that never closes is not closed before the budget (official rules) but cut by it; the
    reserve rules close it reserve // 2 tokens before."""
    tok, t = bpe_tokenizer, tag_ids(bpe_tokenizer)
    model = biased(tok, par=-50.0, path_end=50.0, summary_end=-50.0, eos=-50.0, im_end=-50.0)
    for rules in ("official", "reserve"):
        for r in sample(model, tok, prompts_of(tok)[:2], 2, max_new_tokens=30, force_block=0, seed=1,
                        variant=variant, rules=rules, reserve=8):
            closed = t[SUMMARY_END] in r.ids
            assert len(r.ids) == 30 and r.stop_reason == "budget" and closed == (rules == "reserve")
            assert r.ids[5:8] == [t[PARALLEL_END], *gap_ids(tok), t[SUMMARY]]
            assert r.forced[:8] == [True, True, False, True, False, True, True, True]  # the </Path>s sampled
            assert (r.format_error is None) == closed


@pytest.mark.parametrize("prompts, kw, message", [
    ([[]], {}, "at least one token"),
    ([[5] * 4000], dict(max_new_tokens=200), "exceeds the model's 4096 positions"),
    ([[5] * 50], dict(max_prompt_tokens=40), "longer than max_prompt_tokens"),
    ([[5]], dict(variant="both"), "variant"),
    ([[5]], dict(path_max_tokens=1, rules="reserve"), "at least 2"),
    ([[5]], dict(path_max_tokens=0), "at least 1"),
    ([[5]], dict(rules="vllm"), "rules must be"),
])
def test_bad_inputs(bpe_tokenizer, prompts, kw, message):
    with pytest.raises(ValueError, match=message):
        sample(tiny_model(bpe_tokenizer), bpe_tokenizer, prompts, **kw)

# -----------------------------------------------------------------------------
# sample.py


def _sample_script():
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("sample_script", Path(__file__).resolve().parents[1] / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_script_json_and_tree(bpe_tokenizer, tmp_path, capsys):
    import json
    tiny_model(bpe_tokenizer).save_pretrained(tmp_path)
    bpe_tokenizer.save_pretrained(tmp_path)
    script = _sample_script()
    args = ["--model", str(tmp_path), "--prompt", "Natalia sold 48 clips.", "--n", "2", "--max-new-tokens", "40",
            "--path-max-tokens", "8", "--force-block", "0", "--variant", "unseen", "--rules", "reserve"]
    script.main(args + ["--json"])
    lines = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 2
    for row in rows:  # the rows OUT/rollouts.jsonl holds (rollout_row)
        assert set(row) >= {"prompt", "response", "main", "blocks", "answer", "tokens", "stop_reason"}
        assert len(row["blocks"]) >= 1 and len(row["blocks"][0]["paths"]) == 2 and "summary" in row["blocks"][0]
        ids = bpe_tokenizer(row["response"], add_special_tokens=False)["input_ids"]  # the tags become tag tokens
        assert row["response"].startswith("<Parallel><Path>") and parse_blocks(ids, tag_ids(bpe_tokenizer))[1] is None
    script.main(args)
    out = capsys.readouterr().out
    assert out.count("=== rollout") == 2 and "├─ path 2" in out and "└─ summary" in out and "answer:" in out
    # one format: --show reads back what --json wrote, and prints the same trees
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    script.main(["--show", str(tmp_path / "rows.jsonl")])
    shown = capsys.readouterr().out
    assert shown.count("=== rollout") == 2 and all(tree(row) in shown and tree(row) in out for row in rows)


def test_sample_script_errors(tmp_path, monkeypatch):
    script = _sample_script()
    monkeypatch.chdir(tmp_path)  # no out/toy-* here
    with pytest.raises(SystemExit, match="no toy model yet: run `python train_sft.py --preset toy` first"):
        script.main(["--preset", "toy", "--prompt", "x"])
    with pytest.raises(SystemExit, match="^error: model .*no such model directory"):
        script.main(["--model", str(tmp_path / "missing"), "--prompt", "x"])
