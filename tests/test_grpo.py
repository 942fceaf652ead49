import math

import pytest
import torch

from nanopr1.grpo import KL_BOUND, group_advantages, policy_loss


def test_group_advantages_closed_form_and_flat_groups():
    adv, flat = group_advantages([1.0, -1.0, 1.0, -1.0, -1.0, -1.0, 0.5, 1.0, 1.5], group_size=3)
    g1 = torch.tensor([1.0, -1.0, 1.0])
    torch.testing.assert_close(adv[:3], (g1 - g1.mean()) / (g1.std() + 1e-6))
    assert adv[3:6].tolist() == [0.0, 0.0, 0.0]  # a zero-variance group gives 0, no NaN
    torch.testing.assert_close(adv[6:], torch.tensor([-0.5, 0.0, 0.5]) / (0.5 + 1e-6))
    assert flat == 1 and not adv.isnan().any()
    adv, flat = group_advantages([1.0, -1.0], group_size=1)  # groups of one teach nothing
    assert adv.tolist() == [0.0, 0.0] and flat == 2


def test_two_sequences_loss_and_gradient_equal_closed_form():
    # sequence 1 (A = +1): ratios 1, 0.5, 1.5 (high-clipped) and a forced token (masked)
    # sequence 2 (A = -1): ratios 4 (dual-clipped at 3), 0.5 (low-clipped), 1.1 (inside)
    ratio = torch.tensor([[1.0, 0.5, 1.5, 7.0], [4.0, 0.5, 1.1, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    old = torch.log(torch.full_like(ratio, 0.3))
    logp = (old + ratio.log()).requires_grad_()
    adv = torch.tensor([1.0, -1.0])
    loss, stats = policy_loss(logp, old, adv, mask, num_tokens=6, eps_low=0.2, eps_high=0.2, dual_clip=3.0)
    # per token: -1, -0.5, -1.2 | 3, 0.8, 1.1  -> mean over the 6 loss tokens
    assert math.isclose(loss.item(), (-1 - 0.5 - 1.2 + 3 + 0.8 + 1.1) / 6, rel_tol=1e-6)
    loss.backward()
    # d/dlogp of -ratio * A is -ratio * A where the unclipped branch is active, else 0
    expected = torch.tensor([[-1.0, -0.5, 0.0, 0.0], [0.0, 0.0, 1.1, 0.0]]) / 6
    torch.testing.assert_close(logp.grad, expected)
    assert stats["clipped_tokens"] == 2 and stats["tokens"] == 6


def test_on_policy_ratio_is_one_and_nothing_clipped():
    logp = torch.randn(3, 5)
    loss, stats = policy_loss(logp, logp.clone(), torch.tensor([1.0, -0.5, 0.0]), torch.ones(3, 5), num_tokens=15)
    assert stats["ratio_sum"] == 15 and stats["clipped_tokens"] == 0
    assert math.isclose(loss.item(), -(1.0 - 0.5 + 0.0) * 5 / 15, rel_tol=1e-6)


def test_k3_kl_value_and_gradient_closed_form():
    """k3 = exp(ref - logp) - (ref - logp) - 1 per loss token, times kl_coef, token-mean; its gradient
    with respect to logp is kl_coef * (1 - exp(ref - logp)) / num_tokens; masked tokens add nothing."""
    logp = torch.tensor([[0.0, -1.0, -2.0], [-0.5, -0.5, -3.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -0.5, -3.0], [-1.5, 0.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, _ = policy_loss(logp, logp.detach(), torch.zeros(2), mask, 5, ref_logp=ref, kl_coef=0.1)
    d = (ref - logp.detach()) * mask
    assert math.isclose(loss.item(), 0.1 * float((torch.exp(d) - d - 1).sum()) / 5, rel_tol=1e-6)
    assert loss.item() > 0
    loss.backward()
    torch.testing.assert_close(logp.grad, 0.1 * (1 - torch.exp(d)) * mask / 5)


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_micro_batches_sum_to_the_step_loss(splits):
    torch.manual_seed(0)
    logp, old = torch.randn(8, 6, requires_grad=True), torch.randn(8, 6)
    adv, mask = torch.randn(8), (torch.rand(8, 6) > 0.3)
    full, _ = policy_loss(logp, old, adv, mask, int(mask.sum()))
    (g_full,) = torch.autograd.grad(full, logp)
    total = sum(policy_loss(lp, o, a, m, int(mask.sum()))[0]
                for lp, o, a, m in zip(logp.chunk(splits), old.chunk(splits), adv.chunk(splits), mask.chunk(splits)))
    (g_split,) = torch.autograd.grad(total, logp)
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(g_split, g_full)




def test_huge_log_ratios_and_kls_are_bounded():
    """One token whose trainer and old (or reference) log-probs are 1000 nats apart: finite loss and
    gradient, its ratio exp(20) at most, its KL at most KL_BOUND."""
    logp = torch.tensor([[0.0, -1.0]], requires_grad=True)
    old, ref = torch.tensor([[-1000.0, -1.0]]), torch.tensor([[1000.0, -1.0]])
    loss, stats = policy_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 2), 2, ref_logp=ref, kl_coef=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert stats["ratio_sum"] <= math.exp(20) + 1 and stats["kl_sum"] <= KL_BOUND


@pytest.mark.parametrize("cap, corrected", [(10.0, True), (None, False)])
def test_truncated_importance_weights_correct_a_sampler_mismatch(cap, corrected):
    """A one-token policy pi = softmax(theta) over 6 tokens, rollouts drawn from a planted different sampler
    mu (as a bf16 sampling copy differs from the trainer). Weighted by min(pi / mu, cap), the loss's gradient
    is the on-policy one, d/dtheta of -E_pi[A] = -pi * (A - E_pi[A]); unweighted it is not."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(6, generator=g).requires_grad_()
    mu = torch.softmax(theta.detach() + torch.tensor([1.0, -1.0, 0.5, 0.0, -0.5, 1.5]), -1)  # the mismatch
    A = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])  # an advantage per token value
    x = torch.multinomial(mu, 400_000, replacement=True, generator=g)  # (N,) one token per rollout
    logp = torch.log_softmax(theta, -1)[x][:, None]  # (N, 1)
    loss, _ = policy_loss(logp, logp.detach(), A[x], torch.ones_like(logp), len(x),
                          sampler_logp=mu.log()[x][:, None], tis_cap=cap)
    (grad,) = torch.autograd.grad(loss, theta)
    pi = torch.softmax(theta.detach(), -1)
    exact = -pi * (A - (pi * A).sum())
    error = (grad - exact).abs().max().item()
    assert (error < 0.01) == corrected and (error > 0.05) == (not corrected)
