"""
GRPO, the pieces that are maths; the loop that uses them is train_rl.py.

1. Each prompt is sampled `group_size` times; a rollout's advantage is its reward standardised within
   its group, A = (r - mean) / (std + 1e-6), carried by every token of the rollout. A group whose
   rewards are all equal teaches nothing and gets A = 0 (we count how often).
2. The policy loss is PPO's clipped surrogate per token, with separate low/high clip ranges (0.2, and
   0.2 or 0.28) and the dual clip (3) that bounds the loss of a negative-advantage token whose ratio
   exploded; log-ratios and each token's KL are clamped (verl's bounds).
3. Token-mean over the whole optimizer step: the per-token losses of every micro-batch on every rank are
   summed and divided once by the step's token count (`num_tokens`), so 1, 2 or 4 micro-batches, on 1 or
   2 processes, give the same loss and gradient. Forced tokens and padding carry no loss.

Simplifications: std is the unbiased sample std (as torch.std and verl); no entropy bonus; the KL term is
the optional k3 estimator.
"""

import torch


def group_advantages(rewards, group_size, eps=1e-6):
    """rewards (N,) prompt-major -> (advantages (N,), number of zero-variance groups)."""
    r = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)  # (groups, G)
    # a group whose rewards are all equal (always, if G == 1) has nothing to compare: A = 0, not 0 / 0
    same = (r == r[:, :1]).all(1, keepdim=True)  # (groups, 1)
    mean, std = r.mean(1, keepdim=True), r.std(1, keepdim=True) if group_size > 1 else torch.ones_like(r[:, :1])
    adv = torch.where(same, torch.zeros_like(r), (r - mean) / (std + eps))
    return adv.view(-1), int(same.sum())


LOG_RATIO_BOUND = 20.0  # |log ratio| and |ref - logp| at most this (as verl): exp(20) = 5e8, finite in fp32
KL_BOUND = 10.0         # one token's k3 KL at most this (as verl): one token cannot dominate a step


def policy_loss(logp, old_logp, adv, mask, num_tokens, eps_low=0.2, eps_high=0.2, dual_clip=3.0,
                ref_logp=None, kl_coef=0.0, sampler_logp=None, tis_cap=None):
    """Clipped token-level GRPO loss of one micro-batch: logp, old_logp, ref_logp, sampler_logp, mask (B, T),
    adv (B,); num_tokens: the loss tokens of the WHOLE optimizer step. Returns (loss, stats): the step's
    losses sum to its token mean; the stats are sums over the loss tokens."""
    mask, a = mask.float(), adv[:, None]  # a: (B, 1)
    # PPO's clipped surrogate: the ratio to the old policy may move the loss only within [1 - low, 1 + high]
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))  # (B, T)
    surrogate = torch.maximum(-ratio * a, -ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    # the dual clip bounds the loss of a negative-advantage token whose ratio exploded
    dual = torch.minimum(surrogate, -dual_clip * a)
    per_token = torch.where(a < 0, dual, surrogate)  # (B, T)
    stats = {}
    if tis_cap:
        # truncated importance sampling (verl's rollout correction): each token weighted by min(pi_old /
        # pi_sampler, cap) makes the gradient of rollouts from the (bf16) sampling copy the on-policy one
        weight = torch.exp((old_logp - sampler_logp).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)).clamp(max=tis_cap)
        per_token = per_token * weight
        weight = weight * mask
        stats.update(tis_sum=float(weight.sum()), tis_capped=float((weight >= tis_cap).sum()))
    # the optional k3 estimator of KL(pi || ref), >= 0, towards the frozen reference
    kl = torch.zeros_like(logp)
    if ref_logp is not None and kl_coef > 0:
        d = (ref_logp - logp).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        kl = (torch.exp(d) - d - 1).clamp(max=KL_BOUND)
        per_token = per_token + kl_coef * kl
    # summed here, divided by the step's token count: the micro-batches' losses add up to the token mean
    loss = (per_token * mask).sum() / num_tokens
    with torch.no_grad():
        clipped = ((ratio < 1 - eps_low) & (a < 0)) | ((ratio > 1 + eps_high) & (a > 0))
        stats.update(clipped_tokens=float((clipped.float() * mask).sum()), ratio_sum=float((ratio * mask).sum()),
                     kl_sum=float((kl * mask).sum()), tokens=float(mask.sum()))
    return loss, stats
