"""alignkit.rl_losses against numbers worked out by hand (arithmetic in the comments); no model loaded."""

from __future__ import annotations

import json
import math
from typing import get_args

import pytest
import torch

from alignkit.rl_losses import (
    ADVANTAGES,
    GroupAdvantage,
    RunningMean,
    entropy_from_logits,
    explained_variance,
    gae,
    grpo_advantages,
    kl_estimates,
    kl_k2_loss,
    masked_mean,
    masked_whiten,
    policy_loss,
    rloo_advantages,
    token_rewards,
    uncertainty_penalised_reward,
    value_loss,
)


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ------------------------------------------------------------------------------------------ masked statistics


def test_masked_mean_ignores_padding_even_inf():
    x = t([[1.0, 2.0, math.inf], [4.0, math.nan, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # (1 + 2 + 4) / 3 ; rows: (1 + 2) / 2 = 1.5 and 4 / 1 = 4
    assert masked_mean(x, mask).item() == pytest.approx(7 / 3)
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([1.5, 4.0])


def test_masked_whiten_uses_unbiased_variance():
    x = t([[1.0, 2.0, 3.0, 100.0]])
    mask = t([[1, 1, 1, 0]])
    # mean 2, unbiased var ((-1)^2 + 0 + 1^2) / (3 - 1) = 1 -> [-1, 0, 1]; padding -> 0
    # (a biased var 2/3 would give +-1.2247)
    assert masked_whiten(x, mask).tolist()[0] == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)
    # shift_mean=False: rescaled only, the mean 2 added back
    assert masked_whiten(x, mask, shift_mean=False).tolist()[0] == pytest.approx([1.0, 2.0, 3.0, 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        masked_whiten(x, t([[1, 0, 0, 0]]))


def test_explained_variance_hand_value():
    returns, values = t([[1.0, 2.0, 3.0, 50.0]]), t([[1.0, 2.0, 2.0, -50.0]])
    mask = t([[1, 1, 1, 0]])
    # R - V = [0, 0, 1]: mean 1/3, var (1/9 + 1/9 + 4/9) / 2 = 1/3 ; Var R = (1 + 0 + 1) / 2 = 1 -> 1 - 1/3
    assert explained_variance(values, returns, mask) == pytest.approx(2 / 3)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert math.isnan(explained_variance(values, t([[2.0, 2.0, 2.0, 0.0]]), mask))  # constant returns


# ------------------------------------------------------------------------------------------ rewards and KL


def test_token_rewards_kl_per_token_and_sequence_reward_at_last_completion_token():
    logprobs = t([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.2, -0.3, -9.0]])
    ref = t([[-1.5, -1.0, -0.5, 0.0], [-2.0, -1.0, -0.5, 0.0]])
    mask = t([[1, 1, 1, 0], [0, 1, 1, 0]])  # row 2: a prompt token first, padding last
    seq_reward = t([2.0, -1.0])
    r = token_rewards(seq_reward, logprobs, ref, mask, kl_coef=0.1)
    # row 1: log-ratio [0.5, -1, 0] -> -0.1 x = [-0.05, 0.1, 0] ; +2 at t = 2 ; padding 0
    # row 2: log-ratio [(1), -0.2, 0.2, (-9)] -> [0, 0.02, -0.02, 0] ; -1 at t = 2 -> -1.02
    assert r.tolist()[0] == pytest.approx([-0.05, 0.1, 2.0, 0.0], abs=1e-6)
    assert r.tolist()[1] == pytest.approx([0.0, 0.02, -1.02, 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="at least one completion token"):
        token_rewards(seq_reward, logprobs, ref, t([[1, 1, 0, 0], [0, 0, 0, 0]]), kl_coef=0.1)
    with pytest.raises(ValueError, match="seq_reward"):
        token_rewards(t([1.0]), logprobs, ref, mask, kl_coef=0.1)


def test_kl_estimates_k1_and_k3_summed_over_completion_tokens():
    logprobs, ref = t([[-1.0, -2.0, 0.0]]), t([[-1.5, -1.0, 5.0]])
    mask = t([[1, 1, 0]])
    kl = kl_estimates(logprobs, ref, mask)
    # log r = ref - logp = [-0.5, 1] ; k1 = sum(-log r) = 0.5 - 1 = -0.5
    # k3 = sum (e^{log r} - 1) - log r = (0.60653066 - 1 + 0.5) + (2.71828183 - 1 - 1) = 0.82481249
    assert kl["k1"].tolist() == pytest.approx([-0.5])
    assert kl["k3"].tolist() == pytest.approx([0.82481249], abs=1e-6)


def test_kl_k2_loss_value_and_gradient():
    logprobs = t([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]]).requires_grad_()
    ref = t([[-1.5, -1.0, 7.0], [-0.5, 0.0, 0.0]]).requires_grad_()
    mask = t([[1, 1, 0], [1, 0, 0]])
    loss = kl_k2_loss(logprobs, ref, mask, beta1=0.1)
    # d = logp - ref on the 3 completion tokens = [0.5, -1, 0] ; 0.1 * (0.25 + 1 + 0) / 3 = 0.0416667
    assert loss.item() == pytest.approx(0.125 / 3)
    loss.backward()
    # d loss / d logp = 2 * beta1 * d / n = 0.2 * [0.5, -1, 0] / 3 ; 0 on padding
    expected = [[0.1 / 3, -0.2 / 3, 0.0], [0.0, 0.0, 0.0]]
    for row, want in zip(logprobs.grad.tolist(), expected, strict=True):
        assert row == pytest.approx(want, abs=1e-7)
    assert ref.grad is None  # the reference is a constant


def test_uncertainty_penalised_reward_updates_running_mean_first():
    running_u = RunningMean()
    u1, r1 = t([0.2, 0.6]), t([1.0, 0.5])
    running_u.update(u1)  # u-bar = 0.4 (the batch is included)
    r = uncertainty_penalised_reward(r1, u1, running_u.mean, beta2=0.5)
    # 1 - 0.5 * (0.2 - 0.4) = 1.1 ; 0.5 - 0.5 * (0.6 - 0.4) = 0.4 ; first batch: mean penalty 0
    assert r.tolist() == pytest.approx([1.1, 0.4])
    assert r.mean().item() == pytest.approx(r1.mean().item())
    running_u.update(t([1.0]))  # u-bar = (0.2 + 0.6 + 1.0) / 3 = 0.6
    # 0 - 0.5 * (1.0 - 0.6) = -0.2
    assert uncertainty_penalised_reward(t([0.0]), t([1.0]), running_u.mean, 0.5).tolist() == pytest.approx([-0.2])
    assert uncertainty_penalised_reward(r1, u1, 0.4, beta2=0.0).tolist() == pytest.approx([1.0, 0.5])
    with pytest.raises(ValueError, match="beta2"):
        uncertainty_penalised_reward(r1, u1, 0.4, beta2=-1.0)
    with pytest.raises(ValueError, match="differ"):
        uncertainty_penalised_reward(r1, t([0.1]), 0.4, beta2=1.0)


def test_running_mean_save_restore_equals_uninterrupted():
    batches = [t([1.0, 2.0, 3.0]), t([4.0, 5.0]), t([0.1, 0.7, 0.3, 0.9])]
    straight = RunningMean()
    for b in batches:
        straight.update(b)
    first = RunningMean()
    first.update(batches[0])
    assert (first.count, first.mean) == (3, 2.0)
    saved = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
    resumed = RunningMean()
    resumed.load_state_dict(saved)
    for b in batches[1:]:
        resumed.update(b)
    assert resumed.state_dict() == straight.state_dict()  # bit-exact
    # (1 + 2 + 3 + 4 + 5 + 0.1 + 0.7 + 0.3 + 0.9) / 9 = 17 / 9
    assert straight.count == 9 and straight.mean == pytest.approx(17 / 9)
    resumed.update(torch.empty(0))
    assert resumed.count == 9
    with pytest.raises(ValueError, match="NaN"):
        resumed.update(t([math.nan]))


def test_running_mean_is_stable_far_from_zero():
    rm = RunningMean()
    for _ in range(1000):
        rm.update(torch.tensor([1e9 + 1.0, 1e9 + 3.0], dtype=torch.float64))
    assert rm.mean - 1e9 == pytest.approx(2.0, abs=1e-6)


# ------------------------------------------------------------------------------------------ advantages


def test_gae_short_trajectory_with_padding():
    rewards = t([[0.0, 0.0, 1.0, 9.0], [9.0, 0.0, 1.0, 9.0]])
    values = t([[0.5, 0.2, 0.4, 9.0], [9.0, 0.5, 0.3, 9.0]])
    mask = t([[1, 1, 1, 0], [0, 1, 1, 0]])  # row 1: 4th token padding ; row 2: prompt token, padding
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 1, no bootstrap past t = 2:
    #   t=2: delta = 1 + 0 - 0.4 = 0.6                 A = 0.6
    #   t=1: delta = 0 + 0.4 - 0.2 = 0.2               A = 0.2 + 0.5 * 0.6 = 0.5
    #   t=0: delta = 0 + 0.2 - 0.5 = -0.3              A = -0.3 + 0.5 * 0.5 = -0.05
    #   returns = A + V = [0.45, 0.7, 1.0]
    # row 2: t=2: delta = 1 - 0.3 = 0.7, A = 0.7 ; t=1: delta = 0.3 - 0.5 = -0.2, A = -0.2 + 0.35 = 0.15
    assert adv.tolist()[0] == pytest.approx([-0.05, 0.5, 0.6, 0.0], abs=1e-6)
    assert ret.tolist()[0] == pytest.approx([0.45, 0.7, 1.0, 0.0], abs=1e-6)
    assert adv.tolist()[1] == pytest.approx([0.0, 0.15, 0.7, 0.0], abs=1e-6)
    assert ret.tolist()[1] == pytest.approx([0.0, 0.65, 1.0, 0.0], abs=1e-6)
    # gamma = lam = 1: returns are the Monte-Carlo reward-to-go [1, 1, 1]
    _, mc = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert mc.tolist()[0] == pytest.approx([1.0, 1.0, 1.0, 0.0], abs=1e-6)


REWARDS_2x3 = [1.0, 2.0, 6.0, 0.0, 0.0, 3.0]  # prompt 1: samples 1, 2, 6 ; prompt 2: 0, 0, 3


def test_rloo_two_prompts_three_samples():
    # prompt 1: sum 9, baselines (9-1)/2 = 4, (9-2)/2 = 3.5, (9-6)/2 = 1.5 -> [-3, -1.5, 4.5]
    # prompt 2: sum 3, baselines 1.5, 1.5, 0 -> [-1.5, -1.5, 3]
    assert rloo_advantages(t(REWARDS_2x3), 3).tolist() == pytest.approx([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])


def test_grpo_two_prompts_three_samples_unbiased_std():
    # prompt 1: mean 3, deviations [-2, -1, 3], unbiased var (4 + 1 + 9) / 2 = 7 -> std sqrt 7
    # prompt 2: mean 1, deviations [-1, -1, 2], unbiased var (1 + 1 + 4) / 2 = 3 -> std sqrt 3
    s7, s3 = math.sqrt(7) + 1e-4, math.sqrt(3) + 1e-4
    want = [-2 / s7, -1 / s7, 3 / s7, -1 / s3, -1 / s3, 2 / s3]
    assert grpo_advantages(t(REWARDS_2x3), 3).tolist() == pytest.approx(want, abs=1e-6)
    assert grpo_advantages(t(REWARDS_2x3), 3, scale=False).tolist() == pytest.approx([-2, -1, 3, -1, -1, 2])
    # a group of equal rewards: 0 / (0 + eps) = 0, not NaN
    assert grpo_advantages(t([5.0, 5.0]), 2).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("name", ["rloo", "grpo"])
def test_group_advantages_reject_bad_k(name):
    fn = ADVANTAGES[name]
    with pytest.raises(ValueError, match="k >= 2"):
        fn(t([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="multiple of k=3"):
        fn(t([1.0, 2.0, 3.0, 4.0, 5.0]), 3)
    with pytest.raises(ValueError, match="1-D"):
        fn(t([[1.0, 2.0]]), 2)


def test_advantage_table_matches_literal():
    assert set(ADVANTAGES) == set(get_args(GroupAdvantage))


# ------------------------------------------------------------------------------------------ PPO losses


def test_policy_loss_inside_and_outside_the_clip_range():
    ratios = t([[1.1, 1.5, 0.5], [0.5, 3.0, 3.0]])
    advantages = t([[1.0, 1.0, 1.0], [-2.0, 5.0, 5.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    logprobs = ratios.log().requires_grad_()
    loss, stats = policy_loss(logprobs, torch.zeros_like(ratios), advantages, mask, clip_eps=0.2)
    # per token max(-A rho, -A clip(rho, 0.8, 1.2)):
    #   rho 1.1, A  1: max(-1.1, -1.1) = -1.1  (inside)
    #   rho 1.5, A  1: max(-1.5, -1.2) = -1.2  (clipped)
    #   rho 0.5, A  1: max(-0.5, -0.8) = -0.5  (outside, but the unclipped term is the pessimistic one)
    #   rho 0.5, A -2: max( 1.0,  1.6) =  1.6  (clipped)
    # loss = (-1.1 - 1.2 - 0.5 + 1.6) / 4 = -0.3 ; clipfrac 2/4
    assert loss.item() == pytest.approx(-0.3, abs=1e-6)
    assert stats["clipfrac"] == pytest.approx(0.5)
    assert stats["ratio"] == pytest.approx((1.1 + 1.5 + 0.5 + 0.5) / 4)
    # approx_kl = mean (rho - 1) - log rho = (0.0046898 + 0.0945349 + 2 * 0.1931472) / 4
    assert stats["approx_kl"] == pytest.approx(0.4855191 / 4, abs=1e-6)
    loss.backward()
    # d/d log rho of -A rho / 4 where unclipped: -1.1/4, -0.5/4 ; 0 where clipped or padded
    for row, want in zip(logprobs.grad.tolist(), [[-0.275, 0.0, -0.125], [0.0, 0.0, 0.0]], strict=True):
        assert row == pytest.approx(want, abs=1e-6)


def test_value_loss_inside_and_outside_the_clip_range():
    values = t([[0.1, 0.5, 0.5, -1.0, 7.0]])
    old = torch.zeros_like(values)
    returns = t([[1.0, 1.0, 0.0, 0.5, -7.0]])
    mask = t([[1, 1, 1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip_eps=0.2)
    # V 0.1, R 1  : (0.9)^2 = 0.81 ; clip(0.1) = 0.1 -> 0.81          (inside)
    # V 0.5, R 1  : 0.25 ; clip -> 0.2, (0.8)^2 = 0.64 -> 0.64        (clipped)
    # V 0.5, R 0  : 0.25 ; clip -> 0.2, 0.04 -> 0.25                  (unclipped is larger)
    # V -1,  R 0.5: 2.25 ; clip -> -0.2, 0.49 -> 2.25
    # loss = 0.5 * (0.81 + 0.64 + 0.25 + 2.25) / 4 = 0.49375 ; vf_clipfrac 1/4
    assert loss.item() == pytest.approx(0.49375, abs=1e-6)
    assert stats["vf_clipfrac"] == pytest.approx(0.25)
    # R - V = [0.9, 0.5, -0.5, 1.5]: sum sq dev from 0.6 = 2.12 ; R: from 0.625 = 0.6875 -> 1 - 2.12/0.6875
    assert stats["explained_variance"] == pytest.approx(1 - 2.12 / 0.6875, abs=1e-5)


def test_entropy_from_logits():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [-math.inf, 0.0], [math.nan, math.nan]]])
    mask = t([[1, 1, 1, 0]])
    # uniform over 2: log 2 = 0.6931472 ; p = (0.75, 0.25): 0.75 * 0.2876821 + 0.25 * 1.3862944 = 0.5623351
    # a -inf logit: p = (0, 1) -> 0 (not NaN) ; the NaN padded token is ignored
    assert entropy_from_logits(logits, mask).item() == pytest.approx((0.6931472 + 0.5623351) / 3, abs=1e-6)
    # differentiable, and a -inf logit leaves the gradient finite
    finite = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [-math.inf, 0.0]]], requires_grad=True)
    entropy_from_logits(finite, t([[1, 1, 1]])).backward()
    assert torch.isfinite(finite.grad).all()
    # dH/dz for p = softmax(z): -p_v (log p_v + H_row); uniform row: H = log 2 -> -(1/2)(-log 2 + log 2) = 0
    assert finite.grad[0, 0].tolist() == pytest.approx([0.0, 0.0], abs=1e-7)
