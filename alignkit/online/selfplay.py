"""Self-play (SPPO Algorithm 1) arithmetic, pure functions: P̂ from a preference matrix, the kept samples,
and the per-iteration evaluation's length-controlled win rate. docs/algorithms/sppo.md.
"""

from __future__ import annotations

import math

import torch


def p_hat(matrix: torch.Tensor) -> torch.Tensor:
    """P̂(y_i ≻ π_t | x) = (1/K) Σ_j P(y_i ≻ y_j | x), self included (P(y_i ≻ y_i) = ½), so P̂ ∈ [½K⁻¹, 1 − ½K⁻¹]
    (SPPO Algorithm 1 step 3). `matrix` (N, K, K) with P[n, i, j] = P(y_i ≻ y_j | x_n); returns (N, K)."""
    if matrix.dim() != 3 or matrix.shape[1] != matrix.shape[2]:
        raise ValueError(f"expected an (N, K, K) preference matrix, got {tuple(matrix.shape)}")
    eye = torch.eye(matrix.shape[1], dtype=torch.bool, device=matrix.device)
    return torch.where(eye, torch.full_like(matrix, 0.5), matrix).mean(-1)


def winner_loser(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(winner, loser, kept) per prompt from P̂ (N, K): winner = argmax, loser = argmin (the first index on
    ties); `kept` is False where every sample has the same P̂ (then winner = loser: no pair to learn from)."""
    winner, loser = p.argmax(-1), p.argmin(-1)
    kept = p.max(-1).values > p.min(-1).values
    return winner, loser, kept


def length_controlled_win_rate(wins: torch.Tensor, len_diff: torch.Tensor, l2: float = 1e-3,
                               iterations: int = 50) -> float:
    """The win rate predicted at zero length difference (AlpacaEval-LC's idea, Dubois et al. 2024): a
    logistic regression `P(win) = σ(a + b·d)` of the (soft) outcomes `wins` ∈ [0, 1] on the normalised
    length difference d = tanh(len_diff / std(len_diff)), fitted by Newton's method with a small L2 penalty
    on b; returns σ(a). With no length difference in the data it is the plain mean win rate."""
    y = wins.double().flatten()
    diff = len_diff.double().flatten()
    if y.numel() != diff.numel() or y.numel() == 0:
        raise ValueError(f"wins ({y.numel()}) and len_diff ({diff.numel()}) must have the same, non-zero size")
    scale = float(diff.std()) if diff.numel() > 1 else 0.0
    if not scale > 0:
        return float(y.mean())
    x = torch.stack([torch.ones_like(diff), torch.tanh(diff / scale)], 1)
    ridge = torch.diag(torch.tensor([0.0, l2], dtype=torch.float64)) * len(y)
    mean = float(y.mean().clamp(1e-6, 1 - 1e-6))
    w = torch.tensor([math.log(mean / (1 - mean)), 0.0], dtype=torch.float64)
    for _ in range(iterations):
        prob = torch.sigmoid(x @ w)
        grad = x.T @ (prob - y) + ridge @ w
        hess = (x * (prob * (1 - prob))[:, None]).T @ x + ridge + 1e-9 * torch.eye(2, dtype=torch.float64)
        step = torch.linalg.solve(hess, grad)
        w = w - step
        if float(step.abs().max()) < 1e-10:
            break
    return float(torch.sigmoid(w[0]))


__all__ = ["length_controlled_win_rate", "p_hat", "winner_loser"]
