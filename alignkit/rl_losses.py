"""Pure tensor maths for online RL (PPO, UP-RLHF, RLOO, GRPO): advantages, losses, KL estimates.

No model, no I/O. Per-token tensors have shape (B, T); ``mask`` is 1 on completion tokens and 0 on
prompt/padding, and padded entries never reach a result's value (selected out with ``torch.where``, so
even a ``-inf`` log-prob there cannot make it NaN). Losses are minimised; stats are Python floats for metrics.jsonl.
Choices that deviate from or pin down the papers (k2 KL as a per-token mean, the order in which the
running mean ū of UP-RLHF eq. 14 is updated, unbiased variance in whitening, the k1/k3 KL estimators):
docs/algorithms/ppo.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------------


def _n(mask: Tensor, dim: int | None = None) -> Tensor:
    return mask.bool().sum() if dim is None else mask.bool().sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1 (all of them, or along ``dim``).

    An empty mask gives NaN (0/0), as an empty mean should.
    """
    total = torch.where(mask.bool(), x, torch.zeros_like(x))
    return (total.sum() if dim is None else total.sum(dim)) / _n(mask, dim)


def _masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Unbiased (Bessel, divide by n − 1) variance over the masked entries, as TRL's ``masked_var`` (≤ 0.28)."""
    n = int(_n(mask))
    if n < 2:
        raise ValueError(f"need at least 2 unmasked entries for a variance, got {n}")
    centred = torch.where(mask.bool(), x - masked_mean(x, mask), torch.zeros_like(x))
    return centred.pow(2).sum() / (n - 1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Advantage whitening: ``(x − mean) / sqrt(var + eps)`` over the masked entries (unbiased var).

    ``shift_mean=False`` adds the mean back (rescale only). Padded entries come back 0.
    """
    mean = masked_mean(x, mask)
    out = (x - mean) * torch.rsqrt(_masked_var(x, mask) + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """``1 − Var[R − V] / Var[R]`` over the masked entries: 1 = perfect critic, ≤ 0 = no better than a constant.

    NaN when the returns have no variance (metrics.jsonl writes it as null).
    """
    var_r = _masked_var(returns.detach().double(), mask)
    if var_r.item() == 0.0:
        return math.nan
    return 1.0 - (_masked_var((returns - values).detach().double(), mask) / var_r).item()


# ---------------------------------------------------------------------------------------------------
# Rewards and KL (classic RLHF, UP-RLHF eqs. 2, 14, 15)
# ---------------------------------------------------------------------------------------------------


def _last_index(mask: Tensor) -> Tensor:
    """Index of the last 1 in each row of ``mask`` (B, T); every row must have one."""
    m = mask.bool()
    if not bool(m.any(dim=1).all()):
        raise ValueError("every row needs at least one completion token (a row of the mask is all 0)")
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    return torch.where(m, positions, torch.full_like(positions, -1)).amax(dim=1)


def token_rewards(
    seq_reward: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float | Tensor
) -> Tensor:
    """Classic RLHF per-token reward (B, T): ``−kl_coef·(log π − log π_ref)`` on every completion token,
    plus the sequence reward ``seq_reward`` (B,) at the LAST completion token of each row (UP-RLHF eq. 2
    with the KL inside the reward, as in InstructGPT). 0 on padding. No gradient (a rollout quantity).
    """
    if seq_reward.shape != (logprobs.shape[0],):
        raise ValueError(f"seq_reward has shape {tuple(seq_reward.shape)}, expected ({logprobs.shape[0]},)")
    logratio = (logprobs - ref_logprobs).detach()
    rewards = torch.where(mask.bool(), -kl_coef * logratio, torch.zeros_like(logratio))
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    last = _last_index(mask)
    rewards[rows, last] = rewards[rows, last] + seq_reward.detach().to(rewards.dtype)
    return rewards


@torch.no_grad()
def kl_estimates(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Per-sequence KL(π‖π_ref) estimates (B,), summed over completion tokens, for logging.

    With ``log r = log π_ref − log π`` on tokens sampled from π (Schulman's estimators):
    ``k1 = Σ_t −log r = Σ_t (log π − log π_ref)`` (unbiased, can be negative) and
    ``k3 = Σ_t (r − 1) − log r`` (unbiased, ≥ 0 token by token).
    """
    log_r = ref_logprobs - logprobs
    k1 = torch.where(mask.bool(), -log_r, torch.zeros_like(log_r)).sum(dim=1)
    k3 = torch.where(mask.bool(), torch.expm1(log_r) - log_r, torch.zeros_like(log_r)).sum(dim=1)
    return {"k1": k1, "k3": k3}


def kl_k2_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, beta1: float) -> Tensor:
    """UP-RLHF eq. 15 as a loss: ``β1 · E[(log π − log π_ref)²]`` (no ½), the mean over every completion
    token of the batch. The gradient flows through ``logprobs`` only: ``2·β1·(log π − log π_ref)/n``.
    """
    logratio = logprobs - ref_logprobs.detach()
    return beta1 * masked_mean(logratio.pow(2), mask)


def uncertainty_penalised_reward(
    mean_reward: Tensor, uncertainty: Tensor, running_mean_u: float | Tensor, beta2: float
) -> Tensor:
    """UP-RLHF eq. 14: ``r̄ − β2·(u − ū)`` per sequence, with ``u`` the ensemble members' std (eq. 13).

    Call ``RunningMean.update(u)`` with this batch FIRST and pass its ``mean`` as ``running_mean_u``:
    ū covers every sample seen so far, this batch included, so on the first batch the penalty has
    mean 0 instead of being offset by the members' scale (docs/algorithms/ppo.md).
    """
    if mean_reward.shape != uncertainty.shape:
        raise ValueError(f"mean_reward {tuple(mean_reward.shape)} and uncertainty {tuple(uncertainty.shape)} differ")
    if beta2 < 0:
        raise ValueError(f"beta2 must be >= 0, got {beta2}")
    return mean_reward - beta2 * (uncertainty - running_mean_u)


class RunningMean:
    """Mean of every value seen so far (ū of UP-RLHF eq. 14), kept in float64 and checkpointable.

    ``update`` merges a batch by ``mean += (batch_mean − mean)·n/(count + n)`` (stable: no running
    sum that grows with the count). On N ranks, update with the GATHERED values so ū is the same
    on every rank.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0

    def update(self, x: Tensor) -> None:
        x = x.detach().to(torch.float64).flatten()
        n = x.numel()
        if n == 0:
            return
        if not bool(torch.isfinite(x).all()):
            raise ValueError("RunningMean.update got a NaN or infinite value")
        self.count += n
        self.mean += (x.mean().item() - self.mean) * n / self.count

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self.mean = float(state["mean"])

    def __repr__(self) -> str:
        return f"RunningMean(count={self.count}, mean={self.mean!r})"


# ---------------------------------------------------------------------------------------------------
# Advantages: GAE (actor-critic) and the critic-free group estimators
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) on per-token rewards and values.

    ``δ_t = r_t + γ·V_{t+1} − V_t``, ``A_t = δ_t + γλ·A_{t+1}``, scanned right to left; the trajectory
    ends at the last completion token (no bootstrap from padding: V and A beyond it count as 0).
    Returns ``(advantages, returns)`` with ``returns = advantages + values``; both 0 on padding.
    """
    m = mask.bool()
    zeros = torch.zeros_like(values[:, 0])
    next_value, next_adv = zeros, zeros
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(m[:, t], adv, zeros)
        # a padded token cuts the trajectory: what lies after it does not flow back
        next_value = torch.where(m[:, t], values[:, t], zeros)
        next_adv = advantages[:, t]
    returns = torch.where(m, advantages + values, torch.zeros_like(values))
    return advantages, returns


def _groups(rewards: Tensor, k: int) -> Tensor:
    if k < 2:
        raise ValueError(f"group advantages need k >= 2 samples per prompt, got k={k}")
    if rewards.ndim != 1 or rewards.numel() == 0 or rewards.numel() % k != 0:
        raise ValueError(
            f"rewards must be a non-empty 1-D tensor whose length is a multiple of k={k}, "
            f"got shape {tuple(rewards.shape)}"
        )
    return rewards.reshape(-1, k)


def rloo_advantages(rewards: Tensor, k: int) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): ``r_i − mean of the other k − 1`` in its group.

    ``rewards`` (N·k,) holds consecutive blocks of the k samples of each prompt.
    """
    g = _groups(rewards, k)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (k - 1)
    return (g - baseline).reshape(-1)


def grpo_advantages(rewards: Tensor, k: int, eps: float = 1e-4, scale: bool = True) -> Tensor:
    """GRPO (Shao et al. 2024): ``(r − group mean) / (group std + eps)``, grouped as in ``rloo_advantages``.

    The std is UNBIASED (divide by k − 1) and eps is added to the std, as TRL's GRPOTrainer
    (``scale_rewards="group"``); ``scale=False`` keeps only the centring (TRL's ``"none"``).
    """
    g = _groups(rewards, k)
    adv = g - g.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (g.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


GroupAdvantage = Literal["rloo", "grpo"]
ADVANTAGES: dict[str, Callable[[Tensor, int], Tensor]] = {"rloo": rloo_advantages, "grpo": grpo_advantages}


# ---------------------------------------------------------------------------------------------------
# PPO losses (Schulman et al. 2017)
# ---------------------------------------------------------------------------------------------------


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate (PPO eq. 7) as a loss, the mean over completion tokens:
    ``max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε))`` with ``ρ = π/π_old`` per token.

    Stats: ``clipfrac`` (share of tokens where the clipped term is the larger, i.e. active),
    ``approx_kl`` (k3 estimate of KL(π_old‖π) on the rollout's tokens: ``(ρ − 1) − log ρ``),
    ``ratio`` (mean ρ).
    """
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask).item(),
            "ratio": masked_mean(ratio, mask).item(),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss ``½·max((V − R)², (clip(V, V_old ± ε) − R)²)``, the mean over completion tokens
    (PPO2 / OpenAI baselines). Stats: ``vf_clipfrac`` (share where the clipped term is the larger),
    ``explained_variance`` of the returns by ``values``.
    """
    old_values, returns = old_values.detach(), returns.detach()
    v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    err = (values - returns).pow(2)
    err_clipped = (v_clipped - returns).pow(2)
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {
            "vf_clipfrac": masked_mean((err_clipped > err).float(), mask).item(),
            "explained_variance": explained_variance(values, returns, mask),
        }
    return loss, stats


def entropy_from_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean token entropy ``−Σ_v p_v log p_v`` over completion tokens; ``logits`` (B, T, V), computed in
    at least fp32. Differentiable (usable as an entropy bonus).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    # a -inf logit (a masked-out vocabulary entry) has p = 0 and adds 0, not 0·(−inf) = NaN, in the
    # value and in the gradient (hence log p replaced by 0 there before the product)
    entropy = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(dim=-1)
    return masked_mean(entropy, mask)
