"""Pure tensor maths for alignkit: losses, regularisers and evaluation metrics.

No model, no I/O: every function takes tensors (or arrays) and returns tensors or numbers, tested against
hand-computed values. Losses are minimised and averaged over the batch; metrics return float64 Python
numbers. Equations cite the papers (UP-RLHF arXiv 2401.00243, DPO, IPO, KTO, SPPO arXiv 2405.00675,
Q-probe arXiv 2402.14688). Conventions and where alignkit deviates from them (eq. 12 written as a loss,
`member_loss="each"` as a mean, the literal eqs. 17-19 ECE, IPO on averaged log-probs, SPPO's factor 1/2):
docs/algorithms/losses.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------------------------------------------
# Reward modelling (UP-RLHF eqs. 1, 12, 13)
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

    Computed in at least fp32 and differentiable (a subgradient where singular values repeat). A zero
    matrix has ratio 0 and gradient 0, never NaN (docs/algorithms/losses.md, "NNM numerics").
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
    # Independent members: mean over members of each member's mean-over-batch BT loss (= the mean over all
    # N*B elements). A MEAN, not a sum over n, keeps lam on the same scale as in "mean" mode.
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
    """The paper's calibration metric for a reward model (UP-RLHF eqs. 17-19), implemented literally.

    ``d``: per test pair ``r_bar(y_w) - r_bar(y_l)`` (tensor or array; y_w is the human-preferred one).
    ``s = logit(max_conf) / max|d|``, ``p = sigma(s * d)`` (eq. 17, sign typo fixed), ``n_bins`` equal-width
    bins of p over [0, 1] (p = 1.0 in the last bin, a p on an interior edge in the upper bin),
    ``ACC(B) = mean 1[d_i > 0]``, ``CONF(B) = mean p_i``, ``ECE = sum |B|/n |ACC(B) - CONF(B)|`` (eq. 18).
    Returns ``{"ece", "accuracy" (fraction of d > 0), "bins": [{lo, hi, count, acc, conf}], "scale": s}``;
    every d = 0 gives p = 0.5, ``scale = 0.0`` and ECE = 0.5.

    Under this definition ECE <= 0.5 and it measures SHARPNESS (how far the rescaled p sit from 0.5), not
    calibration: report :func:`ece_standard` beside it (docs/algorithms/losses.md, "What this metric
    measures").
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
    confidence. 0 means "when it says 70 %, it is right 70 % of the time".

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
# Preference-optimisation losses (DPO eq. 7, IPO eq. 17, SPPO eqs. 4.7 and 4.12, KTO eq. 7)
# ---------------------------------------------------------------------------------------------------
#
# Inputs are per-sequence SUMMED log-probs of the completion, shape (B,) (IPO: per-token averaged, as TRL);
# logratio(y) = log pi_theta(y|x) - log pi_ref(y|x), Delta = logratio(y_w) - logratio(y_l); SPPO's eta = 1/beta
# and its "reference" is pi_t, the policy at the start of the iteration (SPPO eq. 4.6). Every loss is a
# batch mean. cDPO, IPO vs SPPO eq. 4.14, SPPO's factor 1/2: docs/algorithms/losses.md.


def _logratios(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """``(logratio(y_w), logratio(y_l))`` after checking shapes and beta."""
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1:
        raise ValueError(f"policy/ref chosen/rejected log-probs must share one shape (B,), got {sorted(shapes)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return policy_chosen - ref_chosen, policy_rejected - ref_rejected


def _as_prob(prob: Tensor | float, like: Tensor, name: str) -> Tensor:
    p = torch.as_tensor(prob, dtype=like.dtype, device=like.device)
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"{name} must lie in [0, 1]")
    return p


def preference_rewards(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """Implicit rewards ``(beta * logratio(y_w), beta * logratio(y_l))``, detached, for logging.

    The same quantities TRL logs as ``rewards/chosen`` and ``rewards/rejected`` (DPO eq. 5: the policy
    defines the reward ``beta log pi_theta/pi_ref`` up to a prompt-only term).
    """
    lw, ll = _logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return beta * lw.detach(), beta * ll.detach()


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """DPO (Rafailov et al. 2023 eq. 7 = SPPO eq. 4.13): ``mean -log sigma(beta * Delta)``, TRL's "sigmoid".

    ``label_smoothing`` = eps in [0, 0.5) gives cDPO, ``-(1-eps) log sigma(z) - eps log sigma(-z)`` with
    z = beta*Delta, i.e. BCE against the soft label 1 - eps. Since ``-log sigma(-z) = -log sigma(z) + z`` this
    is ``-log sigma(z) + eps*z``: it stops pushing once sigma(z) reaches 1 - eps.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    lw, ll = _logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    z = beta * (lw - ll)
    return (-(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)).mean()


def ipo_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> Tensor:
    """IPO (Azar et al. 2023 eq. 17): ``mean (Delta - 1/(2 beta))^2``; beta is IPO's tau.

    Not SPPO's "simplified" eq. 4.14 (which targets beta*Delta = 1 and is scaled by beta^2): IPO eq. 17, as
    TRL. Pass per-token AVERAGED log-probs to match TRL 1.16 (alignkit's convention); pass sums to match the
    SPPO reference code's iterative-IPO baseline.
    """
    lw, ll = _logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return ((lw - ll - 1.0 / (2.0 * beta)) ** 2).mean()


def sppo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    prob: Tensor | float,
) -> Tensor:
    """Pairwise soft SPPO loss (SPPO eq. 4.12), eta = 1/beta, ``prob`` = P(y_w > y_l | x) in [0, 1]:

    ``mean (logratio_w - eta (P - 1/2))^2 + (logratio_l + eta (P - 1/2))^2``.

    The loser's target is eta (P(y_w < y_l) - 1/2) = -eta (P - 1/2). P = 1 is TRL's ``sppo_hard``
    (:func:`sppo_hard_loss`, exactly); P = 1/2 (a tie) pulls both log-ratios to 0 (no update at y, §4).
    Swapping the pair together with P -> 1 - P leaves the loss unchanged. SPPO's beta-scaled form
    ``(a - 1/2)^2 + (b + 1/2)^2`` (§4.5, a = beta*logratio_w, b = beta*logratio_l) is beta^2 times the P = 1 case.
    """
    lw, ll = _logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    target = (_as_prob(prob, lw, "prob") - 0.5) / beta
    return ((lw - target) ** 2 + (ll + target) ** 2).mean()


def sppo_hard_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> Tensor:
    """TRL 1.16's ``loss_type="sppo_hard"``: ``mean (logratio_w - 0.5/beta)^2 + (logratio_l + 0.5/beta)^2``.

    Eq. 4.12 with the hard label P = 1 (TRL's comment cites eq. 4.7 with P = 1 for the winner, 0 for the
    loser): no 1/2 factor, averaged over the batch.
    """
    lw, ll = _logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return ((lw - 0.5 / beta) ** 2 + (ll + 0.5 / beta) ** 2).mean()


def sppo_self_play_loss(
    logratio_w: Tensor, logratio_l: Tensor, p_hat_w: Tensor | float, p_hat_l: Tensor | float, beta: float
) -> Tensor:
    """SPPO Algorithm 1 step 5 (eq. 4.7 on the kept winner and loser), the reference code's loss:

    ``mean 1/2 [(logratio_w - eta (P_hat_w - 1/2))^2 + (logratio_l - eta (P_hat_l - 1/2))^2]``, eta = 1/beta,
    where ``P_hat(y) = P_hat(y > pi_t | x)`` is y's mean win rate against the K samples (self included,
    SPPO Algorithm 1 step 3). Takes log-ratios (summed, against pi_t) directly. Both targets are free: the
    loser's P_hat_l is usually but not necessarily < 1/2. Equal to :func:`sppo_sample_loss` over the 2B samples.
    """
    if logratio_w.shape != logratio_l.shape:
        raise ValueError(f"logratio_w {tuple(logratio_w.shape)} and logratio_l {tuple(logratio_l.shape)} differ")
    p_w, p_l = _as_prob(p_hat_w, logratio_w, "p_hat_w"), _as_prob(p_hat_l, logratio_l, "p_hat_l")
    targets = torch.cat([p_w.expand_as(logratio_w), p_l.expand_as(logratio_l)])
    return sppo_sample_loss(torch.cat([logratio_w, logratio_l]), targets, beta)


def sppo_sample_loss(logratio: Tensor, p_hat: Tensor | float, beta: float) -> Tensor:
    """SPPO eq. 4.7 per sample, ``mean (logratio - eta (P_hat - 1/2))^2`` with eta = 1/beta: the loss of
    ``alignkit sppo --select all`` (every sample with its own P_hat) and, over the winners and losers, of
    :func:`sppo_self_play_loss`."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    target = (_as_prob(p_hat, logratio, "p_hat") - 0.5) / beta
    return ((logratio - target) ** 2).mean()


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO (KTO eq. 7) on unpaired data, as TRL 1.16's ``KTOTrainer`` (``loss_type="kto"``).

    Per example, with r = logratio(y) and z0 = ``kl``:
    desirable ``w_d * (1 - sigma(beta (r - z0)))``, undesirable ``w_u * (1 - sigma(beta (z0 - r)))``.
    The result is the plain MEAN over all B examples of these weighted terms (TRL concatenates them and
    takes ``nanmean``): the weights are not normalised, and the desirable/undesirable mix of the batch
    sets their relative share.

    ``kl``: the batch estimate z0 of KL(pi_theta || pi_ref). TRL computes it on MISMATCHED pairs (each
    prompt with another example's completion): ``z0 = mean_batch(logp_policy - logp_ref)``, averaged over
    ranks, detached, clamped at 0. It is detached and clamped here too, so gradients never flow through it.
    """
    if policy_logps.shape != ref_logps.shape or desirable.shape != policy_logps.shape:
        raise ValueError(
            f"policy_logps {tuple(policy_logps.shape)}, ref_logps {tuple(ref_logps.shape)} and desirable "
            f"{tuple(desirable.shape)} must share one shape (B,)"
        )
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor, got {desirable.dtype}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    z0 = kl.detach().clamp_min(0)
    r = policy_logps - ref_logps
    desirable_terms = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    undesirable_terms = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(desirable, desirable_terms, undesirable_terms).mean()


# The uniform signature of the pairwise losses: (policy_chosen, policy_rejected, ref_chosen, ref_rejected,
# beta, prob=None) -> scalar loss. ``prob`` = P(y_w > y_l) is used by "sppo" (required there) and ignored by
# the others, so one SPPO-style dataset with soft probabilities serves the DPO/IPO baselines unchanged.
# cDPO's label_smoothing is not part of it: wrap dpo_loss with functools.partial if a trainer needs it.
PreferenceLoss = Literal["dpo", "ipo", "sppo-hard", "sppo"]


def _sppo_table_entry(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float, prob: Tensor | float | None = None
) -> Tensor:
    if prob is None:
        raise ValueError('loss "sppo" needs prob = P(y_w > y_l); use "sppo-hard" for hard labels (P = 1)')
    return sppo_loss(pc, pr, rc, rr, beta, prob)


PREFERENCE_LOSSES: dict[str, Callable[..., Tensor]] = {
    "dpo": lambda pc, pr, rc, rr, beta, prob=None: dpo_loss(pc, pr, rc, rr, beta),
    "ipo": lambda pc, pr, rc, rr, beta, prob=None: ipo_loss(pc, pr, rc, rr, beta),
    "sppo-hard": lambda pc, pr, rc, rr, beta, prob=None: sppo_hard_loss(pc, pr, rc, rr, beta),
    "sppo": _sppo_table_entry,
}


# ---------------------------------------------------------------------------------------------------
# Q-probe (Li et al. 2024, arXiv 2402.14688: eqs. 2-7)
# ---------------------------------------------------------------------------------------------------
#
# q holds probe values Q_theta(x, a), r the rewards of the same samples. A CHUNK is k samples of ONE prompt,
# shape (C, k); the probe policy picks a ~ softmax_i(Q(x, a_i) / beta) among them (Q-probe §4.1). beta = 0 is
# the argmax policy, ties split evenly (the beta -> 0 limit). Choices: docs/algorithms/losses.md, "Q-probe".


def qprobe_q_loss(q: Tensor, r: Tensor) -> Tensor:
    """Q-probe reward regression, eq. 2: ``mean (Q - r)^2``."""
    if q.shape != r.shape:
        raise ValueError(f"q {tuple(q.shape)} and r {tuple(r.shape)} differ in shape")
    return ((q - r.to(q.dtype)) ** 2).mean()


def qprobe_ce_loss(q: Tensor, r: Tensor) -> Tensor:
    """Q-probe classification, eq. 3 written as a loss: ``mean BCE(sigma(Q), r)`` for binary r in {0, 1}."""
    if q.shape != r.shape:
        raise ValueError(f"q {tuple(q.shape)} and r {tuple(r.shape)} differ in shape")
    if not bool(((r == 0) | (r == 1)).all()):
        raise ValueError("the ce loss (eq. 3) needs binary rewards in {0, 1}")
    return F.binary_cross_entropy_with_logits(q, r.to(q.dtype))


def policy_weights(q: Tensor, beta: float) -> Tensor:
    """The probe policy's choice probabilities over the last dim: ``softmax(Q / beta)``; for ``beta = 0``
    uniform over the argmax (ties split evenly, the beta -> 0 limit)."""
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta == 0:
        top = q == q.max(dim=-1, keepdim=True).values
        return top.to(q.dtype) / top.sum(dim=-1, keepdim=True)
    return torch.softmax(q / beta, dim=-1)


def qprobe_pg_loss(q: Tensor, r: Tensor, baseline: float | Tensor = 0.0, beta: float = 1.0) -> Tensor:
    """Q-probe policy gradient, eq. 5 with a baseline: ``mean_chunks -sum_i (r_i - b) softmax_i(Q_i / beta)``.

    ``q`` and ``r`` are ``(C, k)`` chunks (k samples of one prompt per row). The softmax weight rho of
    eq. 4 approximates pi_{theta,k}/p0, so minimising this maximises the probe policy's expected reward.
    The reference code trains with beta = 1 and b = :func:`global_baseline`.
    """
    if q.dim() != 2 or q.shape != r.shape:
        raise ValueError(f"q and r must be (C, k) chunks of one shape, got {tuple(q.shape)} and {tuple(r.shape)}")
    if not beta > 0:
        raise ValueError(f"the pg loss needs beta > 0 (a softmax temperature), got {beta}")
    advantage = r.to(q.dtype) - baseline
    return -(advantage * torch.softmax(q / beta, dim=-1)).sum(dim=-1).mean()


def qprobe_pref_loss(q_chosen: Tensor, q_rejected: Tensor) -> Tensor:
    """Q-probe from preferences, eqs. 6-7: ``mean -log sigma(Q(a_w) - Q(a_l))`` (Bradley-Terry on Q)."""
    return bradley_terry(q_chosen, q_rejected)


def policy_expected_reward(q: Tensor, r: Tensor, beta: float) -> Tensor:
    """``(C,)`` expected reward of the probe policy on each chunk: ``sum_i policy_weights(Q, beta)_i r_i``
    (analytic: the expectation over the policy's draw, not a draw)."""
    if q.shape != r.shape:
        raise ValueError(f"q {tuple(q.shape)} and r {tuple(r.shape)} differ in shape")
    return (policy_weights(q, beta) * r.to(q.dtype)).sum(dim=-1)


def global_baseline(r: Tensor, prompt_index: Tensor) -> float:
    """The pg baseline of the reference code: the mean over prompts of each prompt's mean reward (one
    context-independent constant; equals ``r.mean()`` when every prompt has the same number of samples)."""
    if r.shape != prompt_index.shape or r.dim() != 1:
        raise ValueError("r and prompt_index must be 1-d tensors of one shape")
    _, group = torch.unique(prompt_index, return_inverse=True)
    n = torch.bincount(group).to(torch.float64)
    sums = torch.zeros_like(n).index_add_(0, group, r.to(torch.float64))
    return float((sums / n).mean())


def chunk_by_prompt(prompt_index: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """``(C, k)`` sample indices: each row is k samples of ONE prompt (eq. 5's chunks and the evaluation's).

    A prompt with n samples gives ``n // k`` chunks; its ``n % k`` leftover samples are left out. Without a
    generator the samples keep their order (prompt by prompt, in order of prompt id); with one they are
    shuffled within each prompt first (a fresh grouping every epoch). Vectorised: no loop over prompts.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if prompt_index.dim() != 1:
        raise ValueError("prompt_index must be 1-d")
    _, group = torch.unique(prompt_index, return_inverse=True)
    n = group.numel()
    base = torch.arange(n) if generator is None else torch.randperm(n, generator=generator)
    order = base[torch.argsort(group[base], stable=True)]  # grouped by prompt, shuffled (or not) inside
    counts = torch.bincount(group)
    starts = torch.cumsum(counts, 0) - counts
    g = group[order]
    position = torch.arange(n) - starts[g]
    keep = position < (counts // k * k)[g]
    return order[keep].reshape(-1, k)
