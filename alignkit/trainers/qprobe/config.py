"""Q-probe's configs, file names and CLI parsing helpers: importable without torch (fast `--help`).

One config per step: `CollectConfig` (collect), `FitConfig` (fit), `ProbeEvalConfig` (eval); `sample`
takes keyword arguments. Field defaults are the paper's or its reference code's (docs/algorithms/qprobe.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from alignkit.config import CHAT_HELP, Block, ChatMode, OutputSection
from alignkit.errors import UserError

FEATURES_FILE, INDEX_FILE, META_FILE = "features.safetensors", "index.jsonl", "meta.json"
PROBE_FILE, PROBE_INFO = "probe.safetensors", "probe.json"
FORMAT = "alignkit-qprobe-features/1"
NO_REWARD = "none"  # `--reward none`: collect features only (fit then refuses: rewards missing)
FLOAT32_MAX = 3.4028234663852886e38


class Common(Block):
    """Options of every Q-probe step (inf/nan are refused by config.Block, as for every config)."""

    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="model dtype")
    output: OutputSection = Field(default_factory=OutputSection)

    @model_validator(mode="after")
    def _no_resume(self) -> Common:
        if self.output.resume:
            raise ValueError("output.resume: Q-probe steps take seconds to minutes; use --overwrite to redo a run")
        return self


class CollectConfig(Common):
    """`alignkit qprobe collect`: samples + rewards + features of a base model."""

    command: Literal["qprobe-collect"] = "qprobe-collect"
    model: str = Field("tiny", description="base model p0: alias, model dir, run dir, or tiny")
    prompts: str = Field("builtin:prompts", description="prompt source (any kind with a prompt column)")
    pairs: str | None = Field(
        None, description="pairwise source: embed its chosen/rejected completions (pref loss) instead of sampling"
    )
    max_samples: int | None = Field(64, ge=1, description="use only the first N prompts / pairs (None: all)")
    n: int = Field(16, ge=1, description="samples per prompt (the reference code trains on 200)")
    layer: int | None = Field(None, description="hidden-state layer (0 = embeddings; default round(0.8 · layers))")
    embed: str | None = Field(
        None, description="API mode: an encoder spec (e.g. minilm) embedding prompt + '\\n' + completion"
    )
    reward: str = Field("gold", description="Scorer spec (rewards.load_scorer): gold, module:function, RM dir; none")
    max_new_tokens: int = Field(48, ge=1, description="tokens per completion")
    temperature: float = Field(1.0, ge=0.0, description="sampling temperature (paper, MBPP: 0.8)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling (paper, MBPP: 0.95)")
    batch_size: int = Field(64, ge=1, description="sequences per generate call / forward")
    seed: int = Field(0, ge=0, description="sampling seed (and seed of the built-in prompts)")
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="sampler: hf (hidden states captured while sampling) or vllm (extra alignkit[vllm], a CUDA "
        "GPU; hidden states from one teacher-forced forward after sampling)"
    )
    chat: ChatMode = Field("auto", description=CHAT_HELP)

    @model_validator(mode="after")
    def _check(self) -> CollectConfig:
        if self.embed is not None and self.layer is not None:
            raise ValueError("layer: --layer picks a hidden state; with --embed the encoder gives the features")
        if self.pairs is not None and self.backend != "hf":
            raise ValueError("backend: --pairs embeds given completions and samples nothing: drop --backend vllm")
        return self


class FitConfig(Common):
    """`alignkit qprobe fit`: train a probe on collected features."""

    command: Literal["qprobe-fit"] = "qprobe-fit"
    features: str = Field(..., description="a directory written by `alignkit qprobe collect`")
    loss: Literal["q", "ce", "pg", "pref"] = Field(
        "pg", description="q (eq. 2), ce (eq. 3), pg (eq. 5), pref (eqs. 6-7)"
    )
    k: int = Field(10, ge=1, description="pg: samples per chunk; also the k of the validation metric")
    beta: float = Field(1.0, gt=0.0, description="pg: softmax temperature in training (reference: 1)")
    lr: float = Field(5e-5, gt=0.0, description="AdamW learning rate (paper: 5e-5)")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay (paper config: 0)")
    epochs: int = Field(150, ge=1, description="passes over the training set (paper: 150)")
    batch_size: int = Field(1000, ge=1, description="samples (pairs for pref) per step; pg: batch_size // k chunks")
    mlp: bool = Field(False, description="2-layer MLP probe (ReLU) instead of Linear(d, 1)")
    hidden: int = Field(256, ge=1, description="MLP hidden width (reference: 256)")
    zero_init: bool = Field(
        True, description="start the output layer at 0 (untrained probe = base sampling); false: PyTorch's init"
    )
    standardize: bool = Field(
        True, description="z-score features with the training mean/std, kept in the probe (paper: no, false)"
    )
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="held-out share of prompts (pairs for pref)")
    binary_threshold: float | None = Field(None, description="target = 1[reward > T] (needed by ce for real rewards)")
    seed: int = Field(0, ge=0, description="probe init, split, chunking and batch order")
    device: str = Field("cpu", description="cpu, cuda, auto (fitting takes seconds)")

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        if v / (1 - 0.9) > FLOAT32_MAX:  # AdamW's first step size lr / (1 - β1) must be a float32
            raise ValueError(f"lr: {v:g} is too large for AdamW in float32 (its step size lr/(1-β1) overflows)")
        return v


class ProbeEvalConfig(Common):
    """`alignkit qprobe eval`: probe policies vs base, greedy and best-of-k on held-out features."""

    command: Literal["qprobe-eval"] = "qprobe-eval"
    probes: dict[str, str] = Field(default_factory=dict, description="display name -> probe run directory")
    features: str = Field(..., description="held-out features written by `alignkit qprobe collect`")
    ks: list[int] | None = Field(None, description="chunk sizes k (default: powers of 2 up to samples per prompt)")
    betas: list[float] = Field([0.0, 0.1, 1.0], description="policy temperatures β (0 = argmax)")
    model: str | None = Field(None, description="base model for the greedy baseline (omitted when not given)")
    reward: str | None = Field(None, description="reward for greedy completions (default: the features' reward)")
    binary_threshold: float | None = Field(None, description="evaluate 1[reward > T] instead of the reward")
    batch_size: int = Field(64, ge=1, description="sequences per generate call (greedy)")

    @field_validator("ks")
    @classmethod
    def _ks(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 1):
            raise ValueError(f"ks: every k must be >= 1 (got {v})")
        return v

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: list[float]) -> list[float]:
        if not v or min(v) < 0:
            raise ValueError(f"betas: every β must be >= 0, 0 meaning argmax (got {v})")
        return v

    @model_validator(mode="after")
    def _check(self) -> ProbeEvalConfig:
        if not self.probes:
            raise ValueError("probes: no probe runs to evaluate: pass at least one PROBE_RUN (DIR or NAME=DIR)")
        return self


def parse_list(text: str | None, cast: Callable[[str], Any], flag: str) -> list | None:
    """'1,2,4' -> [1, 2, 4] for --k / --beta (None stays None)."""
    if text is None:
        return None
    try:
        return [cast(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise UserError(f"{flag} takes a comma-separated list of numbers, got '{text}'") from None


def parse_probes(items: Sequence[str]) -> dict[str, str]:
    """["runs/a", "pg=runs/b"] -> {"a": "runs/a", "pg": "runs/b"} (names must be unique)."""
    from alignkit.runs import parse_named

    return parse_named(list(items), "probe", short_names=True)


def say(console: Any, msg: str) -> None:
    """One dim `qprobe:` status line on the step's console."""
    from rich.markup import escape

    console.print(f"[dim]qprobe:[/dim] {escape(msg)}", highlight=False)


def console_or_stderr(console: Any | None) -> Any:
    from rich.console import Console

    return console or Console(stderr=True)
