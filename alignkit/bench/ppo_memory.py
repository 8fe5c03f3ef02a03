"""Memory of PPO with LoRA: policy, reference and critic on one shared frozen base vs separate copies.

Each layout runs `ppo.run` (GAE, so the critic exists) in its own child process on a randomly initialised
Llama (`random_llama`: weights dominate, as they do at 7B); a third child only imports the stack and loads
the tokenizer, the baseline. Figures per child: the bytes of every live tensor at the end of the loop
(weights, adapters, gradients, optimiser states; found through the garbage collector), the peak from the
start of the loop on and the peak of the whole process. Peaks are the resident set size on CPU (VmHWM,
reset through /proc/self/clear_refs when the loop opens, after malloc_trim; file mappings and allocator
caches count too), `torch.cuda.max_memory_allocated` on a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from alignkit.bench.common import machine, random_llama

LAYOUTS = ("shared", "separate")


def ppo_memory(hidden: int = 1024, layers: int = 12, heads: int = 16, intermediate: int = 2816, iterations: int = 2,
               prompts: int = 4, k: int = 2, max_new_tokens: int = 16, lora_r: int = 16, device: str = "cpu",
               dtype: str = "float32") -> dict[str, Any]:
    """Peak memory of the `shared` and `separate` layouts and of the `baseline` child, and their ratio."""
    with tempfile.TemporaryDirectory(prefix="alignkit-ppo-memory-") as tmp:
        model_dir = random_llama(Path(tmp) / "model", hidden=hidden, layers=layers, heads=heads,
                                 intermediate=intermediate)
        job = {"model": str(model_dir), "iterations": iterations, "prompts": prompts, "k": k,
               "max_new_tokens": max_new_tokens, "lora_r": lora_r, "device": device, "dtype": dtype}
        peak = {name: _run_child({**job, "layout": name, "out": str(Path(tmp) / name)})
                for name in ("baseline", *LAYOUTS)}
    params = peak["shared"].pop("params")
    peak["separate"].pop("params")
    base = peak["baseline"]["peak_gib"]
    above = {name: peak[name]["loop_peak_gib"] - base for name in LAYOUTS}
    return {
        "machine": machine(),
        "settings": {**job, "hidden": hidden, "layers": layers, "heads": heads, "intermediate": intermediate,
                     "params": params, "weights_gib_per_copy": params * (2 if dtype == "bfloat16" else 4) / 2**30},
        "measure": peak["shared"]["measure"],
        "peak_gib": {name: peak[name]["peak_gib"] for name in ("baseline", *LAYOUTS)},
        "loop_peak_gib": {name: peak[name]["loop_peak_gib"] for name in LAYOUTS},
        "live_tensors_gib": {name: peak[name]["live_tensors_gib"] for name in LAYOUTS},
        "ratio_live_tensors": peak["shared"]["live_tensors_gib"] / peak["separate"]["live_tensors_gib"],
        "loop_above_baseline_gib": above,
        "ratio_loop_peak": peak["shared"]["loop_peak_gib"] / peak["separate"]["loop_peak_gib"],
        "ratio_loop_above_baseline": above["shared"] / above["separate"],
        "ratio_whole_run_peak": peak["shared"]["peak_gib"] / peak["separate"]["peak_gib"],
        "time_s": {name: peak[name]["time_s"] for name in ("baseline", *LAYOUTS)},
    }


def _run_child(job: dict[str, Any]) -> dict[str, Any]:
    code = f"from alignkit.bench.ppo_memory import child; child({json.dumps(job)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ppo-memory child ({job['layout']}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child(job_json: str) -> None:
    """In the child: run the layout (or, for `baseline`, only import and load the tokenizer) and print
    one JSON line with its peak memory."""
    import time

    import torch
    from transformers import AutoTokenizer

    from alignkit.trainers import _hf, ppo
    from alignkit.trainers.loop import Loop

    job = json.loads(job_json)
    _hf.quiet_libraries()
    cuda = job["device"].startswith("cuda")
    t0 = time.perf_counter()
    result: dict[str, Any] = {}
    open_loop, marks = Loop.open, {}

    finish_loop = Loop.finish

    def open_and_reset(*args: Any, **kwargs: Any) -> Any:  # the models are loaded: the loop's peak starts here
        marks["whole"] = _peak(cuda, job["device"])
        _reset_peak(cuda, job["device"])
        return open_loop(*args, **kwargs)

    def finish_and_count(self: Any, *args: Any, **kwargs: Any) -> Any:  # the models are still alive here
        marks["tensors"] = _live_tensor_bytes()
        return finish_loop(self, *args, **kwargs)

    Loop.open = open_and_reset  # type: ignore[method-assign]
    Loop.finish = finish_and_count  # type: ignore[method-assign]
    if job["layout"] == "baseline":
        AutoTokenizer.from_pretrained(job["model"])
        _reset_peak(cuda, job["device"])
        if cuda:
            torch.zeros(1, device=job["device"])  # the CUDA context, which every layout has too
    else:
        cfg = ppo.PPOConfig(
            model={"name": job["model"], "device": job["device"], "dtype": job["dtype"],
                   "lora": {"enabled": True, "r": job["lora_r"], "alpha": 2 * job["lora_r"]}},
            data={"max_samples": 64},
            ppo={"iterations": job["iterations"], "prompts_per_iteration": job["prompts"], "k": job["k"],
                 "max_new_tokens": job["max_new_tokens"], "minibatch_size": job["prompts"] * job["k"],
                 "ppo_epochs": 1, "advantage": "gae", "share_base": job["layout"] == "shared"},
            train={"save_steps": 0}, output={"dir": job["out"]},
        )
        summary = ppo.run(cfg)
        result["params"] = summary["total_params"]
    loop_peak = _peak(cuda, job["device"])
    whole = max(loop_peak, marks.get("whole", 0))
    measure = "torch.cuda.max_memory_allocated" if cuda else "peak resident set size (VmHWM)"
    print(json.dumps({**result, "peak_gib": whole / 2**30, "loop_peak_gib": loop_peak / 2**30, "measure": measure,
                      "live_tensors_gib": marks.get("tensors", 0) / 2**30, "time_s": time.perf_counter() - t0}))


def _live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage alive in the process (weights, adapters, gradients, optimiser
    states, batches), found through the garbage collector: what the layout holds, without the allocator's
    and the file mappings' noise that RSS carries."""
    import gc

    import torch

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
                storage = obj.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        except Exception:  # noqa: BLE001 - some tensor subclasses cannot expose a storage
            continue
    return sum(seen.values())


def _peak(cuda: bool, device: str) -> int:
    """Peak bytes since the process started or the last `_reset_peak`."""
    import torch

    if cuda:
        return torch.cuda.max_memory_allocated(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory needs Linux")


def _reset_peak(cuda: bool, device: str) -> None:
    import torch

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    else:
        import ctypes

        # memory freed while loading stays in glibc's arenas (and in RSS) until trimmed; then VmHWM := RSS
        # (Linux ≥ 4.0), so that the loop's peak counts live memory, not the loader's leftovers
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")


__all__ = ["LAYOUTS", "child", "ppo_memory"]
