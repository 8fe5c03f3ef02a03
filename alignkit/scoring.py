"""The types every reward and preference judge shares: `Scores`, `Scorer`, `Preference`.

A small module below `rewards.py` / `reward_models.py` (learned reward models, functions,
preferences) and `code_reward.py` (unit tests run in the sandbox), so that each imports the types
from here and none imports another for them.
Interfaces and spec strings: docs/rewards.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from alignkit.errors import UserError
from alignkit.losses import uncertainty


@dataclass
class Scores:
    """Rewards of B (prompt, completion) pairs, float32 on CPU."""

    mean: torch.Tensor  # (B,) reward: the ensemble mean r̄ (UP-RLHF eq. 13)
    uncertainty: torch.Tensor  # (B,) population std over members (UP-RLHF eq. 13); zeros for one model
    members: torch.Tensor  # (N, B) per-member rewards; (1, B) for one model

    @classmethod
    def from_members(cls, members: torch.Tensor) -> Scores:
        members = members.detach().float().cpu()
        return cls(mean=members.mean(0), uncertainty=uncertainty(members), members=members)


def checked_scores(members: Any, n: int, source: str) -> Scores:
    """`Scores` of `members` (N, n), after checking there is one score per completion and every score is
    finite: a judge that returns NaN or the wrong count is one `UserError` naming `source`, never a
    silent wrong reward."""
    members = torch.as_tensor(members).detach().to("cpu", torch.float32)
    if members.ndim != 2 or members.shape[1] != n:
        got = members.shape[-1] if members.ndim else 1
        raise UserError(f"{source} returned {got} scores for {n} completions: it must return one number per completion")
    bad = (~torch.isfinite(members)).any(dim=0).nonzero().flatten().tolist()
    if bad:
        raise UserError(
            f"{source} returned a score that is NaN, inf or beyond float32 for {len(bad)} of {n} completions "
            f"(the first: completion {bad[0] + 1}): every score must be a finite number"
        )
    return Scores.from_members(members)


class Scorer(Protocol):
    def score(self, prompts: list, completions: list, finished: list[bool] | None = None) -> Scores: ...


class Preference(Protocol):
    def prob(self, prompts: list, a: list, b: list) -> torch.Tensor: ...  # (B,) P(a ≻ b | prompt)

    def matrix(self, prompt: Any, candidates: list) -> torch.Tensor: ...  # (K, K) P[i, j] = P(y_i ≻ y_j)

    # (N, K, K): one matrix per prompt, K candidates each, in as few model calls as the judge allows
    def matrices(self, prompts: list, candidates: list[list]) -> torch.Tensor: ...


__all__ = ["Preference", "Scorer", "Scores", "checked_scores"]
