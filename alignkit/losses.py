"""Pure tensor maths for alignkit: losses, regularisers and evaluation metrics.

No model, no I/O: every function takes tensors (or plain arrays) and returns tensors or numbers, and is
tested against hand-computed values in ``tests/test_losses.py``. Equation numbers refer to the papers
summarised in ``ALGORITHMS.md`` (UP-RLHF = Zhai et al. 2024, arXiv 2401.00243).

Conventions
-----------
* Rewards are tensors of scalar rewards; ensemble rewards have shape ``(N, B)`` = (members, pairs).
* Losses are quantities to MINIMISE and are averaged (not summed) over the batch.
* Regularisers that the paper maximises (NNM diversity) are returned as the positive quantity to
  maximise; the loss that uses it subtracts it (``loss = bt - lam * nnm``).
* Metrics (:func:`calibration`, :func:`ece_standard`, :func:`auroc`) work in float64 and return plain
  Python numbers, ready for ``summary.json``.

Deviations from / choices beyond the papers
-------------------------------------------
* UP-RLHF eq. 12 prints ``sum_x log sigma(...) + lam * NNM``; we write it as a loss to minimise,
  ``mean_x -log sigma(mean_n r_n(y_w) - mean_n r_n(y_l)) - lam * (1/M) sum_m ||A^(m)||_* / ||A^(m)||_F``
  (the sign of the printed equation is garbled; maximising diversity is the stated intent).
* ``member_loss="each"`` (independent per-member Bradley-Terry, offered by ALGORITHMS.md §1a as
  ``sum_n``) uses the MEAN over members, not the sum, so that ``lam`` has the same scale in both modes.
* The NNM ratio is computed in (at least) fp32 and uses only the LoRA A matrices, as the public
  re-implementation does. A zero matrix has ratio 0 by definition (see :func:`nuclear_norm_ratio`).
* Calibration (eqs. 17-19) is implemented literally as specified, PLUS the standard ECE of Guo et al.
  (2017) in :func:`ece_standard`; see :func:`calibration` for why the two differ and why the paper's
  Table 1 values sit near 0.5. Eq. 17 in the translation has a sign typo; we use
  ``P(y_w > y_l) = sigma(r_w - r_l)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------------------------------------------
# Reward modelling (ALGORITHMS.md §0 step 2, UP-RLHF §3.2)
# ---------------------------------------------------------------------------------------------------


def bradley_terry(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | float | None = None) -> Tensor:
    """Bradley-Terry reward-model loss ``mean(-log sigma(r_w - r_l [- margin]))`` (UP-RLHF eq. 1).

    ``logsigmoid`` keeps it finite for large negative differences (``-log sigma(-100)`` = 100, not inf).
    ``margin`` (scalar or broadcastable tensor) is the optional Llama-2 style margin, subtracted from
    the difference.
    """
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"r_chosen {tuple(r_chosen.shape)} and r_rejected {tuple(r_rejected.shape)} differ in shape")
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def nuclear_norm_ratio(a: Tensor) -> Tensor:
    """``||a||_* / ||a||_F`` for one matrix: the scale-free rank surrogate of UP-RLHF eq. 12.

    It lies in ``[1, sqrt(rank a)]`` (equal singular values give ``sqrt(rank)``, one dominant singular
    value gives 1), so maximising it spreads the spectrum, i.e. makes the rows linearly independent.

    * Computed in at least fp32: bf16/fp16 inputs are upcast (SVD is unsupported or inaccurate there).
    * Differentiable. Only the singular values are used, so autograd returns ``U V^T`` for the nuclear
      norm (no ``1/(s_i^2 - s_j^2)`` terms): with distinct singular values this is the gradient; with
      repeated or zero singular values the nuclear norm is not differentiable and torch returns one
      valid subgradient (one element of the subdifferential), which is fine for SGD.
    * Zero matrix: the ratio is 0/0. peft initialises LoRA B to zero but A randomly, so an all-zero A
      does not happen in practice; we still guard it and DEFINE the ratio as 0 there. The division uses
      ``torch.where`` with an epsilon-clamped denominator in the untaken branch, so the gradient is 0,
      never NaN (a plain ``nuc / fro`` would back-propagate 0/0 = NaN into the whole model).
    """
    if a.ndim != 2:
        raise ValueError(f"nuclear_norm_ratio expects a matrix, got shape {tuple(a.shape)}")
    a = a.to(torch.promote_types(a.dtype, torch.float32))
    nuclear = torch.linalg.svdvals(a).sum()
    # vector_norm's backward is 0 (not NaN) at the zero vector.
    frobenius = torch.linalg.vector_norm(a)
    eps = torch.finfo(a.dtype).tiny ** 0.5  # ~1e-19 in fp32: far below any real LoRA A
    safe = frobenius.clamp_min(eps)
    return torch.where(frobenius > eps, nuclear / safe, torch.zeros_like(nuclear))


def nnm_diversity(a_by_module: Sequence[Sequence[Tensor]]) -> Tensor:
    """NNM diversity of a LoRA ensemble, the quantity to MAXIMISE in UP-RLHF eq. 12.

    ``a_by_module[m][n]`` is member n's LoRA A matrix (shape ``(r, d)``) in adapted module m. For each
    module the members are concatenated along the rank dimension, ``A^(m) = cat_n A_n^(m)`` of shape
    ``(N*r, d)`` (paper Fig. 2), and the result is ``(1/M) sum_m ||A^(m)||_* / ||A^(m)||_F``.
    Identical members give the rank-r value; independent members up to ``sqrt(N*r)``.
    """
    if len(a_by_module) == 0:
        raise ValueError("nnm_diversity needs at least one LoRA module (a_by_module is empty)")
    ratios = []
    for m, members in enumerate(a_by_module):
        if len(members) == 0:
            raise ValueError(f"nnm_diversity: module {m} has no members")
        ratios.append(nuclear_norm_ratio(torch.cat(list(members), dim=0)))
    return torch.stack(ratios).mean()


def _bt_on_mean(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    # The paper (eq. 12): Bradley-Terry on the ensemble's mean reward.
    return bradley_terry(r_chosen.mean(dim=0), r_rejected.mean(dim=0))


def _bt_each(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    # Independent members: mean over members of each member's mean-over-batch BT loss. All members see
    # the same B pairs, so this equals the mean over all N*B elements. MEAN (not ALGORITHMS' sum over n)
    # keeps lam on the same scale as in "mean" mode.
    return bradley_terry(r_chosen, r_rejected)


MemberLoss = Literal["mean", "each"]
MEMBER_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mean": _bt_on_mean, "each": _bt_each}


def ensemble_reward_loss(
    r_chosen: Tensor,
    r_rejected: Tensor,
    a_by_module: Sequence[Sequence[Tensor]],
    lam: float,
    member_loss: MemberLoss = "mean",
) -> dict[str, Tensor]:
    """Diverse reward-LoRA ensemble loss (UP-RLHF eq. 12) as a quantity to minimise.

    ``r_chosen``, ``r_rejected``: member rewards of shape ``(N, B)``. Returns
    ``{"loss": bt - lam * nnm, "bt": ..., "nnm": ...}`` (all tensors, ``loss`` differentiable).
    ``member_loss`` picks the BT term from :data:`MEMBER_LOSSES`: ``"mean"`` = BT on the members' mean
    reward (the paper), ``"each"`` = mean over members of the per-member BT loss (independent members,
    which keeps their disagreement informative for uncertainty). With ``lam == 0`` (the paper's
    "LoRA ensemble" baseline) ``a_by_module`` may be empty; ``nnm`` is then reported as 0.
    """
    if r_chosen.ndim != 2 or r_chosen.shape != r_rejected.shape:
        raise ValueError(
            f"ensemble rewards must both have shape (N, B); got {tuple(r_chosen.shape)} and {tuple(r_rejected.shape)}"
        )
    if member_loss not in MEMBER_LOSSES:
        raise ValueError(f"member_loss must be one of {sorted(MEMBER_LOSSES)}, got {member_loss!r}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0 (it weights a diversity bonus), got {lam}")
    bt = MEMBER_LOSSES[member_loss](r_chosen, r_rejected)
    if len(a_by_module) > 0:
        nnm = nnm_diversity(a_by_module)
    elif lam == 0:
        nnm = torch.zeros((), dtype=bt.dtype, device=bt.device)
    else:
        raise ValueError("lam > 0 needs the LoRA A matrices (a_by_module is empty)")
    return {"loss": bt - lam * nnm.to(bt.dtype), "bt": bt, "nnm": nnm}


def ensemble_mean(member_rewards: Tensor) -> Tensor:
    """Ensemble reward ``r_bar = mean_n r_n`` over dim 0 of ``(N, B)`` -> ``(B,)``."""
    return member_rewards.mean(dim=0)


def uncertainty(member_rewards: Tensor) -> Tensor:
    """Reward uncertainty ``u = std_n r_n`` (UP-RLHF eq. 13): the POPULATION std (divide by N, not N-1).

    ``(N, B)`` -> ``(B,)``. With N = 1 it is 0.
    """
    if member_rewards.ndim != 2:
        raise ValueError(f"member_rewards must have shape (N, B), got {tuple(member_rewards.shape)}")
    return member_rewards.std(dim=0, correction=0)


# ---------------------------------------------------------------------------------------------------
# Evaluation metrics: calibration (UP-RLHF eqs. 17-19) and AUROC
# ---------------------------------------------------------------------------------------------------


def _as_f64(x: Any, name: str) -> Tensor:
    # Lists/arrays go straight to float64 (torch.as_tensor would round a Python list through fp32).
    t = x.detach().to("cpu", torch.float64) if isinstance(x, Tensor) else torch.as_tensor(x, dtype=torch.float64)
    t = t.flatten()
    if t.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")
    return t


def _bin_index(p: Tensor, n_bins: int) -> Tensor:
    """Equal-width bin of each p in [0, 1]: bin k holds ``k/n <= p < (k+1)/n``; p = 1.0 joins the last bin.

    Edges are ``k / n_bins`` (exactly the float a user gets for ``k / n``), searched with
    ``right=True`` like ``numpy.digitize``: a p exactly on an interior edge goes to the UPPER bin.
    """
    edges = torch.arange(n_bins + 1, dtype=torch.float64) / n_bins
    return (torch.searchsorted(edges, p, right=True) - 1).clamp(0, n_bins - 1)


def _binned_ece(conf: Tensor, correct: Tensor, n_bins: int) -> tuple[float, list[dict[str, Any]]]:
    # ECE = sum_m |B_m|/n * |ACC(B_m) - CONF(B_m)| (eq. 18), plus the per-bin table for a reliability
    # diagram. Empty bins report count 0 and acc/conf None (JSON-safe, unlike NaN).
    idx = _bin_index(conf, n_bins)
    n = conf.numel()
    ece = 0.0
    bins: list[dict[str, Any]] = []
    for k in range(n_bins):  # n_bins iterations, vectorised over pairs
        mask = idx == k
        count = int(mask.sum())
        acc = float(correct[mask].mean()) if count else None
        cnf = float(conf[mask].mean()) if count else None
        if count:
            ece += count / n * abs(acc - cnf)
        bins.append({"lo": k / n_bins, "hi": (k + 1) / n_bins, "count": count, "acc": acc, "conf": cnf})
    return ece, bins


def calibration(d: Any, n_bins: int = 15, max_conf: float = 0.99) -> dict[str, Any]:
    """The paper's calibration metric for a reward model (UP-RLHF eqs. 17-19, ALGORITHMS.md §1b).

    ``d``: per test pair ``r_bar(y_w) - r_bar(y_l)`` (tensor or array; y_w is the human-preferred one).
    Steps: ``s = logit(max_conf) / max|d|`` so the largest |d| maps to confidence ``max_conf``;
    ``p = sigma(s * d)`` = predicted ``P(y_w > y_l)``; ``n_bins`` equal-width bins of p over [0, 1]
    (bin k is ``[k/n, (k+1)/n)``, p = 1.0 in the last bin, a p on an interior edge in the upper bin);
    ``ACC(B) = mean 1[d_i > 0]``, ``CONF(B) = mean p_i``, ``ECE = sum |B|/n |ACC(B) - CONF(B)|``.

    Returns ``{"ece", "accuracy" (fraction of d > 0), "bins": [{lo, hi, count, acc, conf}], "scale": s}``.
    If every d is 0, s is undefined (0/0); we define p = 0.5 for every pair and report ``scale = 0.0``
    (any finite s gives sigma(s * 0) = 0.5). Then ACC = 0 (no d > 0) and ECE = 0.5.

    What this metric measures (read before comparing to the paper's Table 1)
        Because ``p > 0.5`` exactly when ``d > 0``, ACC(B) is 1 in every bin above 0.5 and 0 in every bin
        below; only the bin straddling 0.5 (``[7/15, 8/15)`` with 15 bins) can mix. Per pair,
        ``|1[d > 0] - p| = min(p, 1 - p)`` (0.5 if d = 0), so by the triangle inequality
        ``ECE = mean_i min(p_i, 1 - p_i)`` exactly when no bin mixes signs and ``<=`` it otherwise.
        Consequences:
        * ECE <= 0.5 always, with equality only when every d = 0. The paper's 0.515 (Llama2-7B, full
          fine-tuning) is therefore impossible under this definition; its code must differ in a way
          the text does not state (e.g. the eq. 17 sign typo, p = sigma(-s d), which gives
          ``mean max(p, 1 - p) >= 0.5`` instead). We implement the definition as specified.
        * It does not compare confidence with correctness: it is a SHARPNESS score (how far the
          rescaled p sit from 0.5), lower = sharper. Values near 0.5 (the paper's 0.48) mean most
          rescaled p are close to 0.5, i.e. most |d| are tiny relative to the single largest |d|
          that fixes the scale (if all other pairs shared one |d|, 0.48 would need |d| ~ 1.7 % of max|d|).
        * A perfectly calibrated reward model that is 70 % accurate (true confidence
          ``q = sigma(d)``, ``P(correct | q) = max(q, 1 - q)``, most confident pair at 0.99 so the
          rescale is the identity) scores ``ECE ~= mean min(q, 1 - q) = 1 - accuracy = 0.30`` here,
          while its standard ECE (:func:`ece_standard`) is 0. A model that is always right with the
          same |d| on every pair scores 1 - 0.99 = 0.01 here and 0.01 in the standard ECE too.
        Report both, and say that this one is the paper's.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if not 0.5 < max_conf < 1.0:
        raise ValueError(f"max_conf must be in (0.5, 1), got {max_conf}")
    d = _as_f64(d, "d")
    dmax = float(d.abs().max())
    scale = math.log(max_conf / (1.0 - max_conf)) / dmax if dmax > 0 else 0.0
    p = torch.sigmoid(scale * d)
    correct = (d > 0).to(torch.float64)
    ece, bins = _binned_ece(p, correct, n_bins)
    return {"ece": ece, "accuracy": float(correct.mean()), "bins": bins, "scale": scale}


def ece_standard(p_chosen: Any, n_bins: int = 15) -> dict[str, Any]:
    """Standard ECE (Guo et al. 2017) of pairwise preference predictions — NOT the paper's metric.

    ``p_chosen``: the model's predicted probability that the human-preferred response wins, e.g.
    ``sigma(r_w - r_l)`` (no rescaling here; pass rescaled values if you want them). The prediction is
    "y_w wins" if ``p > 0.5`` (p = 0.5 counts as wrong, like ``d > 0`` in :func:`calibration`), its
    confidence is ``max(p, 1 - p)`` in [0.5, 1]; confidences are binned into ``n_bins`` equal-width bins
    over [0, 1] (same edges as :func:`calibration`), ``ACC(B)`` = fraction correct, ``CONF(B)`` = mean
    confidence. Unlike the paper's definition, ACC and CONF here can disagree in either direction
    within any bin, so 0 means "when it says 70 %, it is right 70 % of the time".

    Returns ``{"ece", "accuracy", "bins"}``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p = _as_f64(p_chosen, "p_chosen")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("p_chosen must lie in [0, 1]")
    conf = torch.maximum(p, 1.0 - p)
    correct = (p > 0.5).to(torch.float64)
    ece, bins = _binned_ece(conf, correct, n_bins)
    return {"ece": ece, "accuracy": float(correct.mean()), "bins": bins}


def auroc(scores_negative: Any, scores_positive: Any) -> float:
    """AUROC = P(random positive scores above random negative), ties counted 1/2 (Mann-Whitney U).

    Used for "does uncertainty tell OOD (positive) from in-distribution (negative)". O(n log n): rank
    all scores once (tied scores share their average rank), then
    ``U = sum(ranks of positives) - n_pos (n_pos + 1) / 2`` and ``AUROC = U / (n_pos n_neg)``.
    """
    neg = _as_f64(scores_negative, "scores_negative")
    pos = _as_f64(scores_positive, "scores_positive")
    _, inverse, counts = torch.unique(torch.cat([pos, neg]), sorted=True, return_inverse=True, return_counts=True)
    counts = counts.to(torch.float64)
    # A value seen c times occupies 1-based ranks cumsum-c+1 .. cumsum; its average rank is below.
    avg_rank = counts.cumsum(0) - (counts - 1) / 2
    n_pos, n_neg = pos.numel(), neg.numel()
    u = avg_rank[inverse[:n_pos]].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


# ---------------------------------------------------------------------------------------------------
# Preference-optimisation losses (DPO / IPO / SPPO / KTO, ALGORITHMS.md §2-3) — added by later issues.
# ---------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------
# RL losses (PPO clip, value loss, GAE, k2 KL estimator, UP-RLHF eqs. 14-16) — added by later issues.
# ---------------------------------------------------------------------------------------------------
