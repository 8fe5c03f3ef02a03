"""What every benchmark shares: the machine a figure was measured on, loss-log comparison, a random Llama."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """CPU model, cores, torch threads and library versions: what a figure was measured on."""
    import importlib.metadata as md

    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "load_avg_1m": os.getloadavg()[0],  # other work on the machine skews timings: say how busy it was
    }
    for pkg in ("torch", "transformers", "trl", "datasets", "accelerate", "alignkit"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    return info


def log_summary(logs: list[dict[str, Any]]) -> dict[str, Any]:
    """Losses by step and the total non-padding tokens (TRL's cumulative `num_tokens`)."""
    losses = {int(r["step"]): float(r["loss"]) for r in logs if "loss" in r and "step" in r}
    tokens = max((float(r["num_tokens"]) for r in logs if "num_tokens" in r), default=0.0)
    return {"losses": losses, "num_tokens": tokens}



def compare_losses(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """Compare two logged loss curves, allowing for different logging windows.

    transformers logs the MEAN loss since the previous log. alignkit also logs step 1
    (`logging_first_step`), so its step-10 entry averages steps 2-10 while plain TRL's averages 1-10.
    Entries are compared directly where both windows coincide, and everywhere as the running mean
    loss over steps 1..s (window mean x window length, summed), which must agree whatever the windows.
    """
    def running(x: dict[int, float]) -> tuple[dict[int, float], dict[int, int]]:
        total, prev, mean, start = 0.0, 0, {}, {}
        for s in sorted(x):
            total += x[s] * (s - prev)
            mean[s], start[s], prev = total / s, prev, s
        return mean, start

    (ma, sa), (mb, sb) = running(a), running(b)
    common = sorted(set(a) & set(b))
    same = [s for s in common if sa[s] == sb[s]]
    window = max((abs(a[s] - b[s]) for s in same), default=0.0)
    cumulative = max((abs(ma[s] - mb[s]) for s in common), default=float("nan"))
    return {
        "steps_compared": common,
        "same_window_steps": same,
        "max_abs_diff": window,
        "max_abs_diff_running_mean": cumulative,
        "identical": bool(common) and window <= 1e-6 and cumulative <= 1e-6,
    }



def random_llama(out: Path, hidden: int = 2048, layers: int = 16, heads: int = 16, intermediate: int = 5504) -> Path:
    """A randomly initialised Llama of the given size with the built-in tiny tokenizer, saved as safetensors:
    a stand-in for a real checkpoint where no hub is reachable (throughput and memory only; the small vocabulary
    makes its LM head cheaper than a real model's)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from alignkit import models

    tiny = models.build_tiny()
    tok = AutoTokenizer.from_pretrained(tiny)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


