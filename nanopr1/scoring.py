"""
The trainer's view of a sequence: the log-probs of its response tokens, for GRPO (rollouts) and SFT
(teacher traces) alike, and the micro-batches they are computed in. The model's output head computes
the target tokens' log-probs a chunk of positions at a time, each chunk under activation checkpointing,
so full-vocabulary logits never exist for backward (docs/design.md, "Training"). Micro-batches are sized
by a token budget (rows x padded length), not by a count.
"""

from collections import Counter, namedtuple
from contextlib import nullcontext

import torch
from torch.utils.checkpoint import checkpoint

from nanopr1.attention import build_inputs, find_blocks
from nanopr1.rollout import ALL_TAGS, apply_tag_mask

LOGITS_CHUNK_TOKENS = 1024  # rows x positions of logits computed at once (fp32: 1024 x V x 4 bytes)


def _chunk_logprobs(head, h, targets, allowed, tags, temperature):
    """log p(targets) of one chunk: h (B, c, H) -> (B, c) fp32; the (B, c, V) logits live only in here."""
    logits = type(head).forward(head, h).float() / temperature  # (B, c, V) the head's own forward, hooks aside
    if allowed is not None:
        logits = apply_tag_mask(logits, allowed, tags)
    return logits.gather(-1, targets[..., None])[..., 0] - logits.logsumexp(-1)


def token_logprobs(model, batch, first, allowed=None, tags=None, temperature=1.0):
    """log p of input_ids[:, first+1:] (B, L-1-first) fp32; allowed: the sampler's tag masks, if any."""
    targets = batch["input_ids"][:, first + 1:]
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    head = inner.get_output_embeddings()

    def forward(h):  # while the model runs: hidden states (B, 1 + T, H) -> log-probs (B, T) of targets
        h, c = h[:, :-1], max(1, LOGITS_CHUNK_TOKENS // h.shape[0])  # c positions per chunk
        return torch.cat([checkpoint(_chunk_logprobs, head, h[:, s:s + c], targets[:, s:s + c],
                                     None if allowed is None else allowed[:, s:s + c], tags, temperature,
                                     use_reentrant=False) for s in range(0, h.shape[1], c)], 1)
    head.forward = forward
    try:
        return model(**batch, logits_to_keep=batch["input_ids"].shape[1] - first, use_cache=False).logits
    finally:
        del head.forward  # back to the class's forward


def score(model, rollouts, tags, variant, temperature, pad_id, device):
    """The trainer's log-probs of every response token (B, T) under the sampler's tag mask, and the loss
    mask (sampled, not forced, not padding); positions and the Unseen mask from attention.py."""
    batch = build_inputs([r.prompt_ids for r in rollouts], [r.ids for r in rollouts], tags, variant, pad_id)
    B, L = batch["input_ids"].shape
    T, first = max(len(r.ids) for r in rollouts), min(len(r.prompt_ids) for r in rollouts) - 1
    start = torch.tensor([len(r.prompt_ids) - 1 - first for r in rollouts])  # (B,) row of response token 0
    forced = torch.tensor([r.forced + [True] * (T - len(r.ids)) for r in rollouts])  # (B, T) padding: as forced
    allowed = torch.full((B, L - 1 - first), ALL_TAGS)  # (B, L-1-first) all tags outside responses
    for b, r in enumerate(rollouts):  # forced tokens: no mask (and no loss)
        allowed[b, start[b]:start[b] + len(r.ids)] = torch.tensor(r.allowed).masked_fill(forced[b, :len(r.ids)], ALL_TAGS)
    batch = {k: v.to(device) for k, v in batch.items()}
    logp = token_logprobs(model, batch, first, allowed.to(device), tags, temperature)  # (B, L-1-first)
    idx = (start[:, None] + torch.arange(T)).clamp(max=L - 2 - first)  # (B, T)
    return logp.gather(1, idx.to(device)), ~forced.to(device)  # (B, T) response tokens only


def pad_rows(rows, like):
    """Per-rollout lists of floats (old log-probs) as a (B, T) tensor like `like`."""
    return torch.stack([torch.nn.functional.pad(torch.as_tensor(r, dtype=torch.float32), (0, like.shape[1] - len(r)))
                        for r in rows]).to(like)


def sampler_gap(logp, rollouts, variant, tags):
    """Sums of |trainer - sampler| log-prob over the rollouts' sampled tokens (logp: (B, T) or per-rollout rows,
    from the trainer): `gap_*` where the trainer sees exactly what the sampler saw (Unseen: every token; Seen:
    the main line, path 1, summaries), ~0 unless they truly disagree (a bf16 sampling copy: 1e-2 to 1e-1);
    `designed_*` on Seen's paths 2..N, sampled without seeing path 1 and scored after it."""
    out = Counter()
    for lp, r in zip(logp, rollouts):
        diff = (lp[:len(r.ids)].float().cpu() - torch.tensor(r.logprobs)).abs()
        sampled, later = ~torch.tensor(r.forced, dtype=torch.bool), torch.zeros(len(r.ids), dtype=torch.bool)
        # the blocks as the trainer reads them: a last block cut by the budget too (not in r.blocks)
        for b in find_blocks(r.ids, tags, cut=True) if variant == "seen" else []:
            for start, end in b.paths[1:]:
                later[start:end] = True
        out.update(gap_sum=float(diff[sampled & ~later].sum()), gap_tokens=int((sampled & ~later).sum()),
                   designed_sum=float(diff[sampled & later].sum()), designed_tokens=int((sampled & later).sum()))
    return out


def collate(examples, tags, variant, pad_id):
    """An SFT batch of (prompt ids, response ids) examples: model inputs, targets and the loss mask."""
    prompts, responses = [e[0] for e in examples], [e[1] for e in examples]
    batch = build_inputs(prompts, responses, tags, variant, pad_id)
    targets = batch["input_ids"][:, 1:]  # (B, T-1) token t+1 is predicted at t
    loss_mask = torch.zeros_like(targets, dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        loss_mask[b, len(p) - 1:len(p) + len(r) - 1] = True  # exactly the response, EOS included
    return batch, targets, loss_mask


def sequence_nll(model, batch, targets, loss_mask):
    """(B,) summed negative log-likelihood of each sequence's response tokens."""
    first = int(loss_mask.any(0).nonzero()[0])
    return -(token_logprobs(model, batch, first) * loss_mask[:, first:]).sum(1)


def micro_batches(lengths, max_tokens):
    """Sequence indices in micro-batches of similar lengths, rows x longest <= max_tokens (or one alone)."""
    out, rows, longest = [], [], 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if rows and (len(rows) + 1) * max(longest, lengths[i]) > max_tokens:
            out.append(rows)
            rows, longest = [], 0
        rows.append(i)
        longest = max(longest, lengths[i])
    return out + [rows] if rows else out


def micro_batches_on_every_rank(acc, lengths, max_tokens):
    """micro_batches as (indices, live, last), as many on every rank: fillers (live=False) even them out."""
    chunks = micro_batches(lengths, max_tokens)
    n = int(acc.reduce(torch.tensor(len(chunks), device=acc.device), "max").item())
    chunks = [(c, True) for c in chunks] + [(chunks[0][:1], False)] * (n - len(chunks))
    return [(c, live, k == n - 1) for k, (c, live) in enumerate(chunks)]


def sync_gradients(acc, model, last):
    """A backward's context: DDP all-reduces on the last micro-batch; FSDP reduce-scatters each one."""
    return nullcontext() if last or acc.distributed_type == "FSDP" else acc.no_sync(model)


def mini_batches(n_prompts, G, per_mini_batch, rank, world):
    """This rank's rollouts of each mini-batch: a block of the step's prompts, whatever the world size."""
    which = [(j * world + rank) // per_mini_batch for j in range(n_prompts)]  # of this rank's prompts
    return [[j * G + g for j in range(n_prompts) if which[j] == i for g in range(G)]
            for i in range(max(which) + 1)]


MicroBatch = namedtuple("MicroBatch", "ids rollouts live last")  # ids: indices into the step's rollouts


def micro_batches_of(acc, rollouts, ids, max_tokens):
    """The rollouts `ids` as MicroBatches, as many on every rank (micro_batches_on_every_rank)."""
    lengths = [len(rollouts[i].prompt_ids) + len(rollouts[i].ids) for i in ids]
    return [MicroBatch([ids[k] for k in c], [rollouts[ids[k]] for k in c], live, last)
            for c, live, last in micro_batches_on_every_rank(acc, lengths, max_tokens)]


@torch.no_grad()
def fixed_logprobs(model, rollouts, tags, variant, temperature, pad_id, acc, max_tokens, context=nullcontext):
    """The old policy's or the reference's log-probs per rollout, no grad, each micro-batch under `context`."""
    out = [None] * len(rollouts)
    for micro in micro_batches_of(acc, rollouts, list(range(len(rollouts))), max_tokens):
        with context():
            logp, _ = score(model, micro.rollouts, tags, variant, temperature, pad_id, acc.device)
        for i, lp in zip(micro.ids if micro.live else [], logp):
            out[i] = lp[:len(rollouts[i].ids)]
    return out
