"""Reproductions of paper tables on the built-in task, run through `alignkit bench`.

Not library code: each module trains and evaluates a whole table through the trainers' Python API
(`rm_table1`: UP-RLHF Table 1; `preference_table`: DPO/IPO/KTO/SPPO from SFT; `qprobe_table`:
Q-probe policies; `up_rlhf`: UP-RLHF's RL experiment, Figs. 3–5). They share the benchmarks'
helpers (`alignkit.bench.common`). docs/benchmarks.md.
"""

from __future__ import annotations

from pathlib import Path


def quickstart_sft(root: Path, n_eval_prompts: int, seed: int) -> tuple[str, list[str]]:
    """The quickstart's SFT of `tiny` (its data and training settings) trained into root/sft, and
    `n_eval_prompts` held-out prompts (the quickstart's own, seeded `seed + 1234`): (model dir, prompts)."""
    from alignkit import quickstart
    from alignkit.trainers import sft

    qs = quickstart.QuickstartConfig()
    cfg = sft.SFTConfig(model={"name": "tiny", "device": "cpu"}, data=qs.data.model_dump(),
                        train=qs.train.model_dump(), output={"dir": str(root / "sft"), "overwrite": True})
    sft.run(cfg)
    return str(root / "sft" / "model"), quickstart.heldout_prompts(cfg, n_eval_prompts, seed + 1234)
