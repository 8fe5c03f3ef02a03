"""`alignkit bench`: honest, reproducible performance figures for docs/benchmarks.md.

`trl_overhead`: alignkit's SFT and DPO against the same jobs written on TRL; `throughput`: quickstart,
generation, Q-probe fit, reward-scoring cost, PPO rollout
throughput and time split; `common`: the machine description and shared helpers.
The paper-table reproductions (`bench rm-table1`, `pref`, `qprobe`) live in `alignkit.paper_tables`.
"""

from __future__ import annotations

from alignkit.bench.common import compare_losses, log_summary, machine, random_llama
from alignkit.bench.throughput import (
    GEN_MODES,
    ROLLOUT_MODES,
    SCORING_BACKBONES,
    SCORING_CONFIGS,
    generation_overhead,
    ppo_rollout,
    qprobe_fit_time,
    quickstart_time,
    rm_scoring,
)
from alignkit.bench.trl_overhead import (
    BATCH_SIZE,
    DPO_BETA,
    DPO_LR,
    LEARNING_RATE,
    MAX_LENGTH,
    alignkit_config,
    dpo_overhead,
    sft_overhead,
)

__all__ = [
    "BATCH_SIZE", "DPO_BETA", "DPO_LR", "GEN_MODES", "LEARNING_RATE", "MAX_LENGTH", "ROLLOUT_MODES",
    "SCORING_BACKBONES", "SCORING_CONFIGS", "alignkit_config", "compare_losses", "dpo_overhead",
    "generation_overhead", "log_summary", "machine", "ppo_rollout", "qprobe_fit_time", "quickstart_time",
    "random_llama", "rm_scoring", "sft_overhead",
]
