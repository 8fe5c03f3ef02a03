"""Scoring a rollout: any `Scorer` of `rewards.py` (gold, a reward-model dir, an ensemble dir,
`module:function`, `mbpp:`), called once per batch. No reward code lives here or in the loop: a judge
that returns NaN or the wrong count is already one `UserError` (`scoring.checked_scores`)."""

from __future__ import annotations

from typing import Any

from alignkit.errors import UserError
from alignkit.online.rollout import Batch
from alignkit.scoring import Scorer, Scores


def score(scorer: Scorer, batch: Batch) -> Scores:
    """`Scores` of the batch's completions: `.mean` r̄ (B,), `.uncertainty` u (B,), `.members` (N, B)."""
    return scorer.score(batch.prompts, batch.completions, batch.finished.tolist())


def has_members(scorer: Any) -> bool:
    """True for a reward ensemble (several members, so an uncertainty u); False for one model or a function."""
    from alignkit.reward_models import EnsembleScorer

    return isinstance(scorer, EnsembleScorer)


def check_uncertainty(scorer: Any, spec: str, beta2: float) -> None:
    """UP-RLHF's penalty β2·(u − ū) needs an ensemble: β2 > 0 with any other scorer is one `UserError`."""
    if beta2 > 0 and not has_members(scorer):
        raise UserError(f"ppo.beta2={beta2} needs an ensemble reward (the penalty is on the members' spread), "
                        f"but '{spec}' has no members: pass an `alignkit rm-ensemble` run as ppo.reward, "
                        "or set ppo.beta2=0")


__all__ = ["check_uncertainty", "has_members", "score"]
