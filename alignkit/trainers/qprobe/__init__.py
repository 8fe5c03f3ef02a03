"""Q-probe (Li et al. 2024, arXiv 2402.14688): `alignkit qprobe collect | fit | sample | eval`.

A probe Q_θ(x, a) on an embedding of prompt + completion reweights k samples of a frozen base model.
Modules: `config` (configs, no torch), `features` (collect, the features directory), `probe` (the probe
and its fit), `policy` (sample, eval). The names below load their module on first use, so
`from alignkit.trainers import qprobe; qprobe.FitConfig` does not import torch. docs/algorithms/qprobe.md.
"""

from __future__ import annotations

import importlib
from typing import Any

from alignkit.trainers.qprobe.config import (
    FEATURES_FILE,
    FORMAT,
    INDEX_FILE,
    META_FILE,
    NO_REWARD,
    PROBE_FILE,
    PROBE_INFO,
    CollectConfig,
    FitConfig,
    ProbeEvalConfig,
    parse_list,
    parse_probes,
)

_LAZY = {  # name -> module that defines it (imports torch)
    **dict.fromkeys(("Features", "collect", "default_layer", "hidden_features", "load_features", "resolve_layer",
                     "sample_features"), "features"),
    **dict.fromkeys(("Probe", "check_compatible", "fit", "load_probe"), "probe"),
    **dict.fromkeys(("evaluate_probes", "plot", "policy_table", "sample", "table"), "policy"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FEATURES_FILE", "FORMAT", "INDEX_FILE", "META_FILE", "NO_REWARD", "PROBE_FILE", "PROBE_INFO", "CollectConfig",
    "FitConfig", "ProbeEvalConfig", "parse_list", "parse_probes", *sorted(_LAZY),
]
