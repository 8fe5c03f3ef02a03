"""The reward ensemble's shared trunk: with `lora.layers_to_transform` on the top blocks, the blocks
below run once per batch ("shared" mode) and the member rewards equal the unshared forward's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignkit import arena, models
from alignkit.errors import UserError
from alignkit.reward_models import layer_list
from alignkit.rewards import EnsembleScorer, RewardEnsemble
from alignkit.trainers import reward

LORA = models.LoraSpec(r=4, alpha=8, dropout=0.0, target_modules=None)


@pytest.fixture(scope="module")
def texts():
    rows = arena.build_pairwise_offline(12)  # replies of different lengths: padded batches
    return [r["prompt"] for r in rows], [r["chosen"] for r in rows]


def _ensemble(base: str, layers, n: int = 3) -> RewardEnsemble:
    ens = RewardEnsemble.build(base, n_members=n, lora=LORA, seeds=list(range(n)), device="cpu",
                               layers_to_transform=layers)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero (members identical): make the members differ
        for name, p in ens.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    ens.pooled_block = None  # these tests count whole blocks; the pooled last block: test_rm_pooled_block.py
    return ens


def _computed(ens: RewardEnsemble) -> tuple[list[tuple[int, int]], list]:
    """(block index, batch rows) each time a block really computes: forward hooks on each block's
    first submodule (attention), which a block replaying the trunk's output does not call."""
    seen: list[tuple[int, int]] = []
    blocks = layer_list(ens.model.get_base_model())

    def hook(i):
        return lambda m, a, kw, out: seen.append((i, (a[0] if a else kw["hidden_states"]).shape[0]))

    handles = [next(iter(b.children())).register_forward_hook(hook(i), with_kwargs=True)
               for i, b in enumerate(blocks)]
    return seen, handles


@pytest.mark.parametrize("base", ["tiny", "minilm"])
def test_shared_trunk_scores_equal_the_unshared_forward(base, texts, tiny_model_dir):
    ens = _ensemble(base, [-1])
    top = len(layer_list(ens.model.get_base_model())) - 1
    assert ens.shared_layers == top >= 1
    prompts, completions = texts
    mixed = ens.score(prompts, completions, mode="mixed", batch_size=5)
    loop = ens.score(prompts, completions, mode="loop", batch_size=5)
    assert mixed.std(dim=0).mean() > 1e-4  # the members differ: equal rewards are not trivially equal
    assert (mixed - loop).abs().max() < 1e-5
    expected = {  # per batch (5, 5, 2 rows): the trunk once, then the adapted top block on N·B rows
        # at once ("shared") or on B rows once per member ("shared-loop")
        "shared": [x for b in (5, 5, 2) for x in [(i, b) for i in range(top)] + [(top, 3 * b)]],
        "shared-loop": [x for b in (5, 5, 2) for x in [(i, b) for i in range(top)] + [(top, b)] * 3],
    }
    for mode, calls in expected.items():
        seen, handles = _computed(ens)
        try:
            shared = ens.score(prompts, completions, mode=mode, batch_size=5)
        finally:
            for h in handles:
                h.remove()
        assert shared.shape == (3, 12)
        assert (shared - mixed).abs().max() < 1e-5, mode
        assert seen == calls, mode
    # the replayed blocks are restored: a plain loop computes every block for every member again
    seen, handles = _computed(ens)
    ens.score(prompts[:5], completions[:5], mode="loop", batch_size=5)
    for h in handles:
        h.remove()
    assert len(seen) == 3 * (top + 1)


def test_shared_forward_has_the_gradients_of_the_mixed_forward(texts, tiny_model_dir):
    ens = _ensemble("tiny", [-1])
    batch = ens.encode([p + c for p, c in zip(*texts)][:6])
    grads = {}
    for mode in ("mixed", "shared", "loop", "shared-loop"):
        ens.model.zero_grad()
        ens(**batch, mode=mode).pow(2).sum().backward()
        grads[mode] = [p.grad.clone() for p in ens.member_parameters()]
    assert all(g is not None for g in grads["shared"]) and len(grads["shared"]) > 0
    for mode in ("shared", "loop", "shared-loop"):
        assert max((a - b).abs().max().item() for a, b in zip(grads["mixed"], grads[mode])) < 1e-5, mode


def test_layers_to_transform_adapts_only_those_blocks(tmp_path, texts, tiny_model_dir):
    ens = _ensemble("minilm", [-2, -1])
    lora_names = [n for n, _ in ens.model.named_parameters() if "lora_A" in n]
    assert lora_names and all(".layer.4." in n or ".layer.5." in n for n in lora_names)
    assert ens.shared_layers == 4 and ens.info["lora"]["layers_to_transform"] == [4, 5]
    # a saved ensemble keeps its trunk after reloading, and scores the same
    before = ens.score(*texts, mode="shared")
    again = RewardEnsemble.load(ens.save(tmp_path / "ens"), device="cpu")
    assert again.shared_layers == 4
    assert json.loads((tmp_path / "ens" / "members" / "m1" / "adapter_config.json").read_text())[
        "layers_to_transform"] == [4, 5]
    assert (again.score(*texts, mode="shared") - before).abs().max() < 1e-5


def test_no_shared_trunk_when_every_block_is_adapted(texts, tiny_model_dir):
    ens = _ensemble("tiny", None)
    assert ens.shared_layers == 0
    assert (ens.score(*texts, mode="shared") - ens.score(*texts, mode="mixed")).abs().max() == 0
    assert (ens.score(*texts, mode="shared-loop") - ens.score(*texts, mode="loop")).abs().max() == 0
    scorer = EnsembleScorer(ens, mode="auto")
    scorer.score(*texts)
    assert set(scorer.timings) == {"loop", "mixed"}  # nothing to share: not timed


def test_scorer_auto_times_the_shared_mode(texts, tiny_model_dir):
    ens = _ensemble("tiny", [1])
    scorer = EnsembleScorer(ens, mode="auto", batch_size=6)
    s = scorer.score(*texts)
    assert set(scorer.timings) == {"loop", "mixed", "shared", "shared-loop"} and scorer.mode in scorer.timings
    for mode in ("shared", "shared-loop"):
        direct = EnsembleScorer(ens, mode=mode, batch_size=6).score(*texts)
        assert (direct.members - s.members).abs().max() < 1e-5


def test_layers_out_of_range_is_one_user_error(tiny_model_dir):
    with pytest.raises(UserError, match=r"layer 7 does not exist \(the model has 2 layers"):
        RewardEnsemble.build("tiny", n_members=2, lora=LORA, device="cpu", layers_to_transform=[7])
    with pytest.raises(UserError, match="layers_to_transform is empty"):
        RewardEnsemble.build("tiny", n_members=2, lora=LORA, device="cpu", layers_to_transform=[])


def test_rm_ensemble_trains_top_layers_with_the_shared_forward(tmp_path: Path, tiny_model_dir):
    cfg = reward.RMEnsembleConfig.model_validate({
        "model": {"name": "tiny", "device": "cpu", "lora": {"r": 4, "alpha": 8, "layers_to_transform": -1}},
        "data": {"source": "builtin:pairwise", "max_samples": 96, "eval_fraction": 0.25},
        "train": {"epochs": 1, "batch_size": 16, "max_length": 64, "logging_steps": 1, "save_steps": 0},
        "eval": {"ood_max_samples": 24},
        "ensemble": {"n_members": 2, "forward": "shared-loop"},
        "output": {"dir": str(tmp_path / "ens")},
    })
    summary = reward.run_ensemble(cfg)
    out = Path(summary["output_dir"])
    info = json.loads((out / "ensemble.json").read_text())
    assert info["lora"]["layers_to_transform"] == [1]
    assert summary["steps"] > 0 and summary["last_loss"] is not None
    assert "shared" in summary["eval"]["scoring_timings"]
