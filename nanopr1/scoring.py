"""
The trainer's view of a sequence: the log-probs of its response tokens, for GRPO (rollouts) and SFT
(teacher traces) alike, and the micro-batches they are computed in. The model's output head computes
the target tokens' log-probs a chunk of positions at a time, each chunk under activation checkpointing,
so full-vocabulary logits never exist for backward (docs/design.md, "Training"). Micro-batches are sized
by a token budget (rows x padded length), not by a count.
"""

from collections import Counter, namedtuple
from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanopr1.attention import build_inputs, find_blocks
from nanopr1.rollout import ALL_TAGS, apply_tag_mask

LOGITS_CHUNK_TOKENS = 1024  # rows x positions of logits computed at once (fp32: 1024 x V x 4 bytes)


def _chunk_logprobs(head, h, targets, allowed, tags, temperature):
    """log p(targets) of one chunk: h (B, c, H) -> (B, c) fp32; the (B, c, V) logits live only in here."""
    logits = type(head).forward(head, h).float() / temperature  # (B, c, V) the head's own forward, hooks aside
    # the sampler's tag mask: a tag it could not sample has probability 0 for the trainer too
    if allowed is not None:
        logits = apply_tag_mask(logits, allowed, tags)
    return logits.gather(-1, targets[..., None])[..., 0] - logits.logsumexp(-1)


def token_logprobs(model, batch, first, allowed=None, tags=None, temperature=1.0):
    """log p of input_ids[:, first+1:] (B, L-1-first) fp32; allowed: the sampler's tag masks, if any."""
    targets = batch["input_ids"][:, first + 1:]
    # the output head (DDP wraps the model: the head is its inner module's)
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    head = inner.get_output_embeddings()

    def forward(h):  # while the model runs: hidden states (B, 1 + T, H) -> log-probs (B, T) of targets
        h, c = h[:, :-1], max(1, LOGITS_CHUNK_TOKENS // h.shape[0])  # c positions per chunk
        return torch.cat([checkpoint(_chunk_logprobs, head, h[:, s:s + c], targets[:, s:s + c],
                                     None if allowed is None else allowed[:, s:s + c], tags, temperature,
                                     use_reentrant=False) for s in range(0, h.shape[1], c)], 1)
    # For this one call the head's forward is swapped for the chunked one above, so `.logits` below holds
    # the targets' log-probs (B, T), not logits: the (B, T, V) logits never exist (at 4B and 16k tokens,
    # 10 GB in fp32), and the rest of the model's forward runs as usual.
    head.forward = forward
    try:
        return model(**batch, logits_to_keep=batch["input_ids"].shape[1] - first, use_cache=False).logits
    finally:
        del head.forward  # back to the class's forward


def rollout_logprobs(model, rollouts, tags, variant, temperature, pad_id, device):
    """The trainer's log-probs of every response token (B, T) under the sampler's tag mask, and the loss
    mask (sampled, not forced, not padding); positions and the Unseen mask from attention.py."""
    batch = build_inputs([r.prompt_ids for r in rollouts], [r.ids for r in rollouts], tags, variant, pad_id)
    B, L = batch["input_ids"].shape
    # the forward starts at the shortest prompt's last token; row b's response starts `start[b]` later
    T, first = max(len(r.ids) for r in rollouts), min(len(r.prompt_ids) for r in rollouts) - 1
    start = torch.tensor([len(r.prompt_ids) - 1 - first for r in rollouts])  # (B,)
    forced = torch.tensor([r.forced + [True] * (T - len(r.ids)) for r in rollouts])  # (B, T) padding: as forced
    # the tags the sampler allowed at each sampled token; a forced token, prompts and padding: all of them
    allowed = torch.full((B, L - 1 - first), ALL_TAGS)  # (B, L-1-first)
    for b, r in enumerate(rollouts):
        sampled_allowed = torch.tensor(r.allowed).masked_fill(forced[b, :len(r.ids)], ALL_TAGS)
        allowed[b, start[b]:start[b] + len(r.ids)] = sampled_allowed
    batch = {k: v.to(device) for k, v in batch.items()}
    logp = token_logprobs(model, batch, first, allowed.to(device), tags, temperature)  # (B, L-1-first)
    # each row's response tokens, shifted to the left edge
    idx = (start[:, None] + torch.arange(T)).clamp(max=L - 2 - first)  # (B, T)
    return logp.gather(1, idx.to(device)), ~forced.to(device)


def sampler_gap(logp, rollouts, variant, tags):
    """Sums of |trainer - sampler| log-prob over the rollouts' sampled tokens (logp: (B, T) or per-rollout rows,
    from the trainer): `gap_*` where the trainer sees exactly what the sampler saw (Unseen: every token; Seen:
    the main line, path 1, summaries), ~0 unless they truly disagree (a bf16 sampling copy: 1e-2 to 1e-1);
    `later_paths_*` on Seen's paths 2..N, sampled without seeing path 1 and scored after it."""
    out = Counter()
    for lp, r in zip(logp, rollouts):
        # per sampled token: how far apart the two log-probs are
        diff = (lp[:len(r.ids)].float().cpu() - torch.tensor(r.logprobs)).abs()
        sampled, later = ~torch.tensor(r.forced, dtype=torch.bool), torch.zeros(len(r.ids), dtype=torch.bool)
        # the blocks as the trainer reads them: a last block cut by the budget too (not in r.blocks)
        for b in find_blocks(r.ids, tags, cut=True) if variant == "seen" else []:
            for start, end in b.paths[1:]:
                later[start:end] = True
        out.update(gap_sum=float(diff[sampled & ~later].sum()), gap_tokens=int((sampled & ~later).sum()),
                   later_paths_sum=float(diff[sampled & later].sum()),
                   later_paths_tokens=int((sampled & later).sum()))
    return out


def collate(examples, tags, variant, pad_id):
    """An SFT batch of (prompt ids, response ids) examples: the model inputs, and the loss mask (B, L-1) over
    the targets input_ids[:, 1:] (token t+1 is predicted at t)."""
    prompts, responses = [e[0] for e in examples], [e[1] for e in examples]
    batch = build_inputs(prompts, responses, tags, variant, pad_id)
    # the loss is on exactly the response, EOS included: never on the prompt or padding
    loss_mask = torch.zeros_like(batch["input_ids"][:, 1:], dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        loss_mask[b, len(p) - 1:len(p) + len(r) - 1] = True
    return batch, loss_mask


def sequence_nll(model, batch, loss_mask):
    """(B,) summed negative log-likelihood of each sequence's response tokens."""
    # log-probs from the first column any response needs on: the shared prompt columns before it cost nothing
    first = int(loss_mask.any(0).nonzero()[0])
    return -(token_logprobs(model, batch, first) * loss_mask[:, first:]).sum(1)


def micro_batches(lengths, max_tokens):
    """Sequence indices in micro-batches of similar lengths, rows x longest <= max_tokens (or one alone)."""
    # shortest first, so rows of a micro-batch pad little; a new one when one more row passes the budget
    out, rows, longest = [], [], 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if rows and (len(rows) + 1) * max(longest, lengths[i]) > max_tokens:
            out.append(rows)
            rows, longest = [], 0
        rows.append(i)
        longest = max(longest, lengths[i])
    return out + [rows] if rows else out


def micro_batches_on_every_rank(acc, lengths, max_tokens, model=None):
    """Yields micro_batches as (indices, filler), as many on every rank: a filler (the first row again, to
    carry no loss) evens the counts out, so every rank joins each collective of forward and backward. With
    the trained `model`, each is yielded inside its backward's gradient-sync context."""
    chunks = micro_batches(lengths, max_tokens)
    n = int(acc.reduce(torch.tensor(len(chunks), device=acc.device), "max").item())
    for k in range(n):
        # DDP all-reduces the gradients after the last micro-batch only; FSDP reduce-scatters after each
        sync = model is None or k == n - 1 or acc.distributed_type == "FSDP"
        with nullcontext() if sync else acc.no_sync(model):
            yield (chunks[k], False) if k < len(chunks) else (chunks[0][:1], True)


def pad_rows(rows, T, device):
    """Per-rollout log-prob rows (lists or tensors) as one (B, T) fp32 tensor, zeros after each row's end."""
    return torch.stack([F.pad(torch.as_tensor(r, dtype=torch.float32), (0, T - len(r))) for r in rows]).to(device)


def mini_batches(n_prompts, G, per_mini_batch, rank, world):
    """This rank's rollouts of each mini-batch: a block of the step's prompts, whatever the world size."""
    # this rank's prompt j is the step's prompt j * world + rank: its mini-batch is that over the block size
    which = [(j * world + rank) // per_mini_batch for j in range(n_prompts)]
    return [[j * G + g for j in range(n_prompts) if which[j] == i for g in range(G)]
            for i in range(max(which) + 1)]


# what one micro-batch's policy loss needs: its rollouts and (B,) / (B, T) tensors on the device
LossBatch = namedtuple("LossBatch", "rollouts adv old ref sampler n_tokens")


def loss_batches(acc, model, rollouts, ids, max_tokens, adv, old=None, ref=None, sampler=None):
    """Yields the rollouts `ids` (a mini-batch) as LossBatches, as many on every rank, each inside its
    backward's gradient-sync context. old, ref, sampler (--tis-cap): per-rollout log-prob rows, or None."""
    # the loss is the mean over the loss tokens of the mini-batch on every rank
    n_tokens = acc.reduce(torch.tensor(sum(rollouts[i].forced.count(False) for i in ids), device=acc.device,
                                       dtype=torch.float64), "sum").item()
    lengths = [len(rollouts[i].prompt_ids) + len(rollouts[i].ids) for i in ids]
    for chunk, filler in micro_batches_on_every_rank(acc, lengths, max_tokens, model):
        mine = [ids[k] for k in chunk]
        ros = [rollouts[i] for i in mine]
        if filler:  # every token forced: the loss mask is empty, so it adds 0 to loss and gradient
            ros = [replace(r, forced=[True] * len(r.ids)) for r in ros]
        # the advantages, and the old, reference and sampler log-probs padded to the trainer's (B, T)
        T = max(len(r.ids) for r in ros)
        rows = lambda per_rollout: None if per_rollout is None else pad_rows([per_rollout[i] for i in mine], T,
                                                                             acc.device)
        yield LossBatch(ros, adv[mine].to(acc.device), rows(old), rows(ref), rows(sampler), n_tokens)


@torch.no_grad()
def fixed_logprobs(model, rollouts, acc, max_tokens, context=nullcontext, **view):
    """The old policy's or the reference's log-probs per rollout, no grad, each micro-batch under `context`;
    view: rollout_logprobs' keywords."""
    out = [None] * len(rollouts)
    lengths = [len(r.prompt_ids) + len(r.ids) for r in rollouts]
    for chunk, filler in micro_batches_on_every_rank(acc, lengths, max_tokens):
        with context():
            logp, _ = rollout_logprobs(model, [rollouts[i] for i in chunk], **view)
        # each rollout's row, cut to its length (a filler's: not kept)
        for i, lp in zip([] if filler else chunk, logp):
            out[i] = lp[:len(rollouts[i].ids)]
    return out
