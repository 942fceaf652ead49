"""Tests for nanopr1/scoring.py: the chunked, checkpointed log-prob head against full logits
(values and gradients), the bytes autograd saves for it, token-budget micro-batches and the fillers that
even them out over ranks."""

from contextlib import nullcontext

import pytest
import torch

from conftest import tiny_model
from test_sampler import biased, prompts_of
from test_sampler import score as full_forward
from nanopr1 import scoring
from nanopr1.attention import build_inputs, find_blocks
from nanopr1.grpo import policy_loss
from nanopr1.format import tag_ids
from nanopr1.rollout import ALL_TAGS, apply_tag_mask
from nanopr1.sampler import sample


def reference_logprobs(model, rollouts, tags, variant, temperature):
    """The plain way: full logits of every position, masked, log_softmax, gather. (B, T) and the mask."""
    batch = build_inputs([r.prompt_ids for r in rollouts], [r.ids for r in rollouts], tags, variant, pad_id=0)
    logits = model(**batch).logits.float()  # (B, L, V)
    T = max(len(r.ids) for r in rollouts)
    mask = torch.zeros(len(rollouts), T, dtype=torch.bool)
    rows = []
    for b, r in enumerate(rollouts):
        P, n = len(r.prompt_ids), len(r.ids)
        allowed = torch.tensor([ALL_TAGS if f else a for a, f in zip(r.allowed, r.forced)])
        lp = torch.log_softmax(apply_tag_mask(logits[b, P - 1:P + n - 1], allowed, tags) / temperature, -1)
        rows.append(torch.nn.functional.pad(lp.gather(1, torch.tensor(r.ids)[:, None])[:, 0], (0, T - n)))
        mask[b, :n] = ~torch.tensor(r.forced)
    return torch.stack(rows), mask


def rollouts_of(tok, model, variant):
    ros = sample(model, tok, prompts_of(tok), 2, max_new_tokens=40, seed=5, variant=variant, force_block=3)
    # blocks (official rules: the budget may cut the last one; scoring reads it), padding
    assert all(find_blocks(r.ids, tag_ids(tok), cut=True) for r in ros)
    assert len({len(r.prompt_ids + r.ids) for r in ros}) > 1
    return ros


@pytest.mark.parametrize("variant", ["seen", "unseen"])
def test_values_and_gradients_equal_full_logits(bpe_tokenizer, monkeypatch, variant):
    tok, tags = bpe_tokenizer, tag_ids(bpe_tokenizer)
    sampler_model = biased(tok, par=3.0, path_end=2.0, summary_end=2.0, eos=1.0)
    ros, model = rollouts_of(tok, sampler_model, variant), sampler_model.model  # scored by the plain model
    monkeypatch.setattr(scoring, "LOGITS_CHUNK_TOKENS", 16)  # many chunks of 16 / 6 rows = 2 positions
    weights = torch.randn(len(ros), max(len(r.ids) for r in ros))
    grads = []
    for how in ("chunked", "reference"):
        model.zero_grad()
        if how == "chunked":
            logp, mask = scoring.rollout_logprobs(model, ros, tags, variant, 0.7, 0, "cpu")
        else:
            logp, mask = reference_logprobs(model, ros, tags, variant, 0.7)
        (logp * mask * weights).sum().backward()
        grads.append((logp.detach() * mask, mask, [q.grad.clone() for q in model.parameters()]))
    (a, ma, ga), (b, mb, gb) = grads
    assert torch.equal(ma, mb)
    assert (a - b).abs().max() <= 1e-6
    scale = max(x.abs().max() for x in ga)
    assert scale > 1.0  # the gradients are not trivially small
    assert max((x - y).abs().max() for x, y in zip(ga, gb)) <= 1e-6 * scale  # summation order only


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward, parameters excluded."""

    def __init__(self, model):
        self.params = {q.untyped_storage().data_ptr() for q in model.parameters()}
        self.storages = {}

    def pack(self, x):
        s = x.untyped_storage()
        if s.data_ptr() not in self.params:
            self.storages[s.data_ptr()] = s.nbytes()
        return x

    def total(self):
        return sum(self.storages.values())


def saved_bytes(model, fn):
    counter = SavedBytes(model)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda x: x):
        fn()
    return counter.total()


def test_autograd_saves_at_most_one_chunk_of_logits(bpe_tokenizer, monkeypatch):
    """What the log-prob head adds to the bytes saved for backward (over the transformer body alone)
    stays within one chunk of fp32 logits; full logits would cost the whole (B, T, V)."""
    tok, tags = bpe_tokenizer, tag_ids(bpe_tokenizer)
    model = tiny_model(tok).train()
    ros = rollouts_of(tok, biased(tok, eos=1.0), "seen")
    monkeypatch.setattr(scoring, "LOGITS_CHUNK_TOKENS", 24)
    batch = build_inputs([r.prompt_ids for r in ros], [r.ids for r in ros], tags, "seen", pad_id=0)
    B, L = batch["input_ids"].shape
    V = model.config.vocab_size
    body = saved_bytes(model, lambda: model(**batch, logits_to_keep=1))  # the body, one position's logits
    chunked = saved_bytes(model, lambda: scoring.rollout_logprobs(model, ros, tags, "seen", 1.0, 0, "cpu"))
    full = saved_bytes(model, lambda: reference_logprobs(model, ros, tags, "seen", 1.0))
    one_chunk = 24 * V * 4  # (rows x positions) x V fp32
    assert chunked - body <= one_chunk
    assert full - body >= sum(len(r.ids) for r in ros) * V * 4  # the reference keeps every response token's


def test_sequence_nll_equals_full_logits(bpe_tokenizer):
    tok, tags = bpe_tokenizer, tag_ids(bpe_tokenizer)
    model = tiny_model(tok)
    examples = [(p, p[::-1] + [tok.eos_token_id]) for p in prompts_of(tok)]
    batch, mask = scoring.collate(examples, tags, "seen", 0)
    targets = batch["input_ids"][:, 1:]
    with torch.no_grad():
        got = scoring.sequence_nll(model, batch, mask)
        logp = torch.log_softmax(model(**batch).logits[:, :-1].float(), -1).gather(2, targets[..., None])[..., 0]
    torch.testing.assert_close(got, -(logp * mask).sum(1), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("lengths, budget, expected", [
    ([5, 3, 8, 2], 100, [[3, 1, 0, 2]]),            # all fit: one micro-batch, shortest first
    ([5, 3, 8, 2], 10, [[3, 1], [0], [2]]),         # 2 x 3 fits, 3 x 5 and 2 x 8 do not
    ([10, 10, 10], 20, [[0, 1], [2]]),
    ([50, 4], 20, [[1], [0]]),                      # longer than the budget: alone
    ([], 10, []),
])
def test_micro_batches_by_tokens(lengths, budget, expected):
    got = scoring.micro_batches(lengths, budget)
    assert sorted(i for mb in got for i in mb) == list(range(len(lengths)))
    assert all(len(mb) * max(lengths[i] for i in mb) <= budget or len(mb) == 1 for mb in got)
    assert got == expected


def test_scoring_forwards_build_no_kv_cache(bpe_tokenizer):
    """A forward that scores (RL's log-probs, SFT's loss, the old and reference log-probs) passes
    use_cache=False: at 4B a 16k-token micro-batch's cache is ~2.4 GB that nothing reads."""
    model, seen = tiny_model(bpe_tokenizer), []
    model.register_forward_hook(lambda m, args, kwargs, out: seen.append((kwargs.get("use_cache"), out)),
                                with_kwargs=True)
    ids = torch.randint(10, 300, (2, 12))
    with torch.no_grad():
        scoring.token_logprobs(model, {"input_ids": ids}, first=3)
    assert seen and all(flag is False and getattr(out, "past_key_values", None) is None for flag, out in seen)


def test_the_logged_gap_of_a_cut_seen_block_leaves_its_later_paths_out(bpe_tokenizer):
    """A Seen rollout whose last block the budget cuts in its 2nd path: that path was sampled without seeing
    path 1 but is scored after it, so sampler_gap files it under `later_paths`, not under the gap that must be
    ~0 (read from r.blocks, which a cut block is not in, it was 1e-2 and up on the toy)."""
    tok, tags = bpe_tokenizer, tag_ids(bpe_tokenizer)
    model = biased(tok, par=3.0, path_end=-2.0, summary_end=2.0, eos=1.0)  # long paths: the budget cuts them
    ros = sample(model, tok, prompts_of(tok), 2, max_new_tokens=40, seed=5, variant="seen", force_block=3)
    cut = [r for r in ros if r.format_error and len(find_blocks(r.ids, tags, cut=True)[-1].paths) >= 2]
    assert cut, [r.stop_reason for r in ros]
    logp = [lp for lp, _ in full_forward(model, cut, tags, "seen")]  # the trainer's view, through the bias
    gap = scoring.sampler_gap(logp, cut, "seen", tags)
    assert gap["later_paths_tokens"] > 0 and gap["gap_sum"] / gap["gap_tokens"] < 1e-5


class OneOfTwoRanks:
    """An Accelerator stand-in: rank 0 of two, whose other rank has `extra` more micro-batches."""
    device, distributed_type, num_processes = torch.device("cpu"), "NO", 1

    def __init__(self, extra):
        self.extra = extra

    def reduce(self, t, op):
        return t + self.extra if op == "max" else t

    def no_sync(self, model):
        return nullcontext()


def test_filler_micro_batches_carry_no_loss(bpe_tokenizer):
    """A rank with fewer micro-batches than another runs fillers, so both join every collective: a filler's
    rollouts have every token forced, so its loss mask is empty and its loss and gradient are exactly 0."""
    tok, tags = bpe_tokenizer, tag_ids(bpe_tokenizer)
    ros, model = rollouts_of(tok, biased(tok, eos=1.0), "seen"), tiny_model(tok)
    view = dict(tags=tags, variant="seen", temperature=1.0, pad_id=0, device="cpu")
    adv = torch.randn(len(ros))
    batches = list(scoring.loss_batches(OneOfTwoRanks(2), model, ros, list(range(len(ros))), 10**6, adv))
    assert len(batches) == 3 and batches[0].n_tokens == sum(r.forced.count(False) for r in ros)
    assert [len(b.rollouts) for b in batches] == [len(ros), 1, 1]
    for i, b in enumerate(batches):
        model.zero_grad()
        logp, mask = scoring.rollout_logprobs(model, b.rollouts, **view)
        loss, stats = policy_loss(logp, logp.detach(), b.adv, mask, b.n_tokens)
        loss.backward()
        assert mask.any() == (i == 0) and (stats["tokens"] > 0) == (i == 0)
        assert (max(q.grad.abs().max() for q in model.parameters()) > 0) == (i == 0)
