"""The one reward / preference wrapper: every trainer and evaluator scores through here.

Scorers: `RewardModelScorer` (one sequence-classification reward model), `EnsembleScorer` (a
`RewardEnsemble`: UP-RLHF's N LoRA members on one frozen base, eq. 12; uncertainty = std over
members, eq. 13) and `FunctionScorer` (a Python function, or the built-in `gold` reward).
Preferences: `BTPreference` (Bradley–Terry on any scorer), `OraclePreference` (the built-in oracle),
`PairRMPreference` (SPPO's judge, optional extra). The types are those of `alignkit.scoring`.
`load_scorer` / `load_preference` turn a CLI spec into one; `check_scorer_spec` /
`check_preference_spec` validate a spec without loading any model. Reward-model input text,
truncation, the ensemble's modes, offsets and choices (dropout off): docs/rewards.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from alignkit import models
from alignkit.errors import UserError
from alignkit.reward_models import (
    REWARD_CONFIG,
    EnsembleScorer,
    RewardEnsemble,
    RewardModelScorer,
    encode,
    reward_texts,
)
from alignkit.scoring import Preference, Scorer, Scores, checked_scores

SCORER_FORMS = (
    "a run directory of `alignkit rm` or `alignkit rm-ensemble`, a reward-model directory (config.json + "
    "*.safetensors, or a peft SEQ_CLS adapter), an ensemble directory (ensemble.json), 'gold', 'mbpp:SOURCE' "
    "(unit tests of MBPP-style rows, run sandboxed), or 'module:function'"
)
PREFERENCE_FORMS = f"'oracle', 'pairrm', 'oracle:TAU' (TAU > 0) or a scorer: {SCORER_FORMS}"


class FunctionScorer:
    """A Python reward function `fn(prompts, completions, finished)` or `fn(prompts, completions)`
    returning one number per completion (arity read from the signature). A function that raises, or
    returns NaN, inf or the wrong count, ends in one `UserError` naming it."""

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        self.fn, self.name = fn, name
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):  # builtins without a signature: assume the 3-argument form
            self.takes_finished = True
        else:
            positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            star = any(p.kind == p.VAR_POSITIONAL for p in params)
            self.takes_finished = star or len(positional) >= 3

    @classmethod
    def from_spec(cls, spec: str) -> FunctionScorer:
        """`gold` (the built-in task's gold reward) or `module:function`."""
        if spec == "gold":
            return cls(_gold, "gold")
        return cls(_import_function(spec), spec)

    def score(self, prompts: list, completions: list, finished: list[bool] | None = None) -> Scores:
        args = (list(prompts), list(completions)) + ((finished,) if self.takes_finished else ())
        source = f"reward function '{self.name}'"
        try:
            out = self.fn(*args)
        except UserError:
            raise
        except Exception as err:
            if self.fn is _gold:  # alignkit's own code: a bug, not bad input
                raise
            raise UserError(f"{source} raised {type(err).__name__}: {_first_line(err)}") from err
        if isinstance(out, torch.Tensor):
            out = out.detach().cpu().double().numpy()
        try:
            values = np.asarray(out, dtype=np.float64).reshape(1, -1)
        except (TypeError, ValueError) as err:
            raise UserError(f"{source} must return a list of numbers, one per completion: {_first_line(err)}") from err
        return checked_scores(torch.from_numpy(values), len(completions), source)


def _gold(prompts: list, completions: list, finished: list[bool] | None) -> np.ndarray:
    from alignkit import arena

    return arena.gold_reward(completions, finished, prompts)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def _import_function(spec: str) -> Callable[..., Any]:
    """`module:function` -> the function; a module that cannot be imported, or has no such function, is
    one `UserError`."""
    module_name, _, fn_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or whatever the user's module raises while it is imported
        hint = ""
        if module_name.endswith(".py"):
            hint = f"; give the module's name ({module_name[:-3]}), not its file, with its folder on PYTHONPATH"
        raise UserError(
            f"reward function '{spec}': cannot import module '{module_name}' ({type(err).__name__}: "
            f"{_first_line(err)}){hint}"
        ) from err
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"reward function '{spec}': module '{module_name}' has no function '{fn_name}'")
    return fn


def _is_identifier_path(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


ScorerKind = Literal["gold", "mbpp", "function", "ensemble", "model"]


def _parse_scorer_spec(spec: str) -> tuple[ScorerKind, str]:
    """(kind, target) of a scorer spec, checked without loading a model: the target is the data source
    (mbpp), `module:function` (imported now, so a missing one is reported before any work) or the
    directory to load (ensemble, model)."""
    spec = str(spec).strip()
    if spec == "gold":
        return "gold", spec
    if spec.startswith("mbpp:"):
        source = spec.partition(":")[2].strip()
        if not source:
            raise UserError("reward 'mbpp:' names no data: use mbpp:SOURCE, e.g. mbpp:tests/fixtures/mbpp.jsonl")
        return "mbpp", source
    path = Path(spec).expanduser()
    if path.is_dir():
        for ensemble in (path, path / "model", path / "ensemble"):
            if (ensemble / "ensemble.json").is_file():
                return "ensemble", str(ensemble)
        summary = path / "summary.json"
        if summary.is_file() and (path / "model").is_dir():
            try:
                command = json.loads(summary.read_text()).get("command")
            except (OSError, ValueError, AttributeError) as err:
                raise UserError(f"'{summary}' is not a readable run summary ({_first_line(err)})") from err
            if command not in (None, "rm"):
                raise UserError(f"'{spec}' is a run directory of `alignkit {command}`, not a reward model run (rm)")
            return "model", str(path / "model")
        if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
            return "model", str(path)
        raise UserError(f"directory '{spec}' holds no reward model: expected {SCORER_FORMS}")
    module_name, sep, fn_name = spec.partition(":")
    if sep and _is_identifier_path(module_name) and fn_name.isidentifier():
        _import_function(spec)
        return "function", spec
    if path.exists():
        raise UserError(f"reward '{spec}' is a file: expected {SCORER_FORMS}")
    if "/" in spec:
        raise UserError(f"reward '{spec}': no such directory (expected {SCORER_FORMS})")
    raise UserError(f"reward '{spec}' is not understood: expected {SCORER_FORMS}")


def check_scorer_spec(spec: str) -> None:
    """Raise one `UserError` when `spec` cannot name a scorer. Cheap: reads a few files and imports a
    `module:function`'s module, loads no model; call it before sampling."""
    _parse_scorer_spec(spec)


def load_scorer(
    spec: str, device: str = "auto", dtype: str = "auto", batch_size: int = 32, trust_remote_code: bool = False
) -> Scorer:
    """`gold`, `module:function`, `mbpp:SOURCE`, an ensemble / `alignkit rm-ensemble` dir, an `alignkit rm`
    run dir or a reward-model directory -> a Scorer."""
    kind, target = _parse_scorer_spec(spec)
    if kind in ("gold", "function"):
        return FunctionScorer.from_spec(target)
    if kind == "mbpp":  # unit tests run in alignkit.sandbox: 1 if the program passes, else 0
        from alignkit.code_reward import CodeScorer

        return CodeScorer.from_source(target)
    if kind == "ensemble":
        ensemble = RewardEnsemble.load(target, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        return EnsembleScorer(ensemble, batch_size=batch_size)
    return RewardModelScorer.from_dir(
        target, dtype=dtype, device=device, batch_size=batch_size, trust_remote_code=trust_remote_code
    )


# --------------------------------------------------------------------------- preferences


def _outer_prob(s: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """P[..., i, j] = σ((s_i − s_j) / T) over the last axis of s (K,) or (N, K): antisymmetric logits,
    so P + Pᵀ = 1 and the diagonal is 0.5."""
    s = s.double()
    return torch.sigmoid((s[..., :, None] - s[..., None, :]) / temperature).float()


def _same_k(prompts: list, candidates: list[list]) -> int:
    if len(prompts) != len(candidates) or not candidates:
        raise ValueError(f"matrices needs one candidate list per prompt, got {len(prompts)} and {len(candidates)}")
    k = len(candidates[0])
    if any(len(c) != k for c in candidates):
        raise ValueError("matrices needs the same number of candidates for every prompt")
    return k


class BTPreference:
    """Bradley–Terry on a Scorer's ensemble-mean reward: P(a ≻ b) = σ((r̄_a − r̄_b) / temperature)."""

    def __init__(self, scorer: Scorer, temperature: float = 1.0) -> None:
        if not (math.isfinite(temperature) and temperature > 0):
            raise UserError(f"preference temperature must be a finite number > 0, got {temperature}")
        self.scorer, self.temperature = scorer, temperature

    def prob(self, prompts: list, a: list, b: list) -> torch.Tensor:
        if not len(prompts) == len(a) == len(b):
            raise ValueError(f"prob needs as many prompts as a and b, got {len(prompts)}, {len(a)}, {len(b)}")
        r = self.scorer.score(list(prompts) * 2, list(a) + list(b)).mean.double()  # ONE batched call
        return torch.sigmoid((r[: len(a)] - r[len(a) :]) / self.temperature).float()

    def matrix(self, prompt: Any, candidates: list) -> torch.Tensor:
        return self.matrices([prompt], [candidates])[0]

    def matrices(self, prompts: list, candidates: list[list]) -> torch.Tensor:
        k = _same_k(prompts, candidates)
        flat = [c for cs in candidates for c in cs]
        r = self.scorer.score([p for p in prompts for _ in range(k)], flat).mean  # N*K texts, ONE call
        return _outer_prob(r.view(len(prompts), k), self.temperature)


class OraclePreference:
    """The built-in task's oracle: P(a ≻ b) = σ((gold(a) − gold(b)) / τ) (`arena.oracle_prob`); τ
    defaults to `arena.TAU`."""

    def __init__(self, tau: float | None = None) -> None:
        from alignkit import arena

        tau = arena.TAU if tau is None else tau
        if not (math.isfinite(tau) and tau > 0):
            raise UserError(f"oracle tau must be a finite number > 0, got {tau}")
        self.tau = tau

    def prob(self, prompts: list, a: list, b: list) -> torch.Tensor:
        from alignkit import arena

        del prompts
        return torch.as_tensor(arena.oracle_prob(a, b, tau=self.tau)).float()

    def matrix(self, prompt: Any, candidates: list) -> torch.Tensor:
        return self.matrices([prompt], [candidates])[0]

    def matrices(self, prompts: list, candidates: list[list]) -> torch.Tensor:
        from alignkit import arena

        k = _same_k(prompts, candidates)
        gold = torch.as_tensor(arena.gold_reward([c for cs in candidates for c in cs]))
        return _outer_prob(gold.view(len(prompts), k), self.tau)


class PairRMPreference:
    """llm-blender's PairRM (SPPO's preference model). UNTESTED here: the model cannot be downloaded.

    `prob`: σ(logit) of `blender.compare(..., return_logits=True)` (`compare_conversations` for
    message lists). `matrix` follows the SPPO reference code: PairRM's full comparison gives one score
    per candidate, s_i = mean_j (L[i, j] − L[j, i]) (`blender.rank(..., return_scores=True)`), then
    P[i, j] = σ(s_i − s_j), diagonal 0.5 (docs/rewards.md, "PairRM").
    """

    def __init__(self, model: str = "llm-blender/PairRM", device: str = "auto", batch_size: int = 8) -> None:
        try:
            import llm_blender
        except ImportError as err:
            raise UserError(PAIRRM_MISSING) from err
        self.blender = llm_blender.Blender()
        self.blender.loadranker(model, device=str(models.choose_device(device)))
        self.batch_size = batch_size

    def prob(self, prompts: list, a: list, b: list) -> torch.Tensor:
        if a and not isinstance(a[0], str):  # conversations: full message lists incl. the prompt
            convs_a = [list(p) + list(x) for p, x in zip(prompts, a)]
            convs_b = [list(p) + list(x) for p, x in zip(prompts, b)]
            logits = self.blender.compare_conversations(convs_a, convs_b, return_logits=True)
        else:
            logits = self.blender.compare(
                list(prompts), list(a), list(b), batch_size=self.batch_size, return_logits=True
            )
        return torch.sigmoid(torch.as_tensor(np.asarray(logits, dtype=np.float64))).float()

    def matrix(self, prompt: Any, candidates: list) -> torch.Tensor:
        return self.matrices([prompt], [candidates])[0]

    def matrices(self, prompts: list, candidates: list[list]) -> torch.Tensor:
        _same_k(prompts, candidates)
        if not all(isinstance(p, str) for p in prompts):
            raise UserError("PairRM's preference matrix needs plain-text prompts and candidates")
        scores = self.blender.rank(list(prompts), [list(c) for c in candidates], return_scores=True,
                                   batch_size=self.batch_size)
        return _outer_prob(torch.as_tensor(np.asarray(scores, dtype=np.float64)))


PAIRRM_MISSING = "PairRM needs the optional llm-blender package: pip install 'alignkit[pairrm]'"
PreferenceKind = Literal["oracle", "pairrm", "scorer"]


def _parse_preference_spec(spec: str) -> tuple[PreferenceKind, Any]:
    """(kind, value) of a preference spec, checked without loading a model: the oracle's τ (None: the
    default), nothing for pairrm, the scorer spec for Bradley–Terry on a scorer."""
    spec = str(spec).strip()
    if spec == "oracle":
        return "oracle", None
    if spec.startswith("oracle:"):
        text = spec.partition(":")[2].strip()
        try:
            tau = float(text)
        except ValueError:
            tau = math.nan
        if not (math.isfinite(tau) and tau > 0):
            from alignkit.arena import TAU

            raise UserError(f"preference '{spec}': TAU in oracle:TAU must be a number > 0, e.g. oracle:{TAU}")
        return "oracle", tau
    if spec == "pairrm":
        if importlib.util.find_spec("llm_blender") is None:
            raise UserError(PAIRRM_MISSING)
        return "pairrm", None
    module_name, sep, _ = spec.partition(":")
    if spec != "gold" and not Path(spec).expanduser().is_dir() and not (sep and _is_identifier_path(module_name)):
        raise UserError(f"preference '{spec}' is not understood: expected {PREFERENCE_FORMS}")
    _parse_scorer_spec(spec)
    return "scorer", spec


def check_preference_spec(spec: str) -> None:
    """Raise one `UserError` when `spec` cannot name a preference (e.g. `oracle:abc`). Cheap: loads no
    model; call it before sampling, whether or not the preference will be used."""
    _parse_preference_spec(spec)


def load_preference(spec: str, device: str = "auto") -> Preference:
    """`oracle` (or `oracle:TAU`), `pairrm`, or any scorer spec (-> Bradley–Terry on its mean reward)."""
    kind, value = _parse_preference_spec(spec)
    if kind == "oracle":
        return OraclePreference(value)
    if kind == "pairrm":
        return PairRMPreference(device=device)
    return BTPreference(load_scorer(value, device=device))


__all__ = [  # the learned reward models (alignkit.reward_models) and the shared types are reachable from here
    "REWARD_CONFIG",
    "BTPreference",
    "EnsembleScorer",
    "FunctionScorer",
    "OraclePreference",
    "PairRMPreference",
    "Preference",
    "RewardEnsemble",
    "RewardModelScorer",
    "Scorer",
    "Scores",
    "check_preference_spec",
    "check_scorer_spec",
    "encode",
    "load_preference",
    "load_scorer",
    "reward_texts",
]
