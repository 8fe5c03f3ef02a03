"""alignkit bench (alignkit/bench/) and the paper tables it runs (alignkit/paper_tables/): the SFT overhead
benchmark runs, and alignkit's SFT does the same computation as TRL; a small rm-table1 and rm-scoring."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner


@pytest.mark.slow  # a 2-process launch or a benchmark: `make test-all`
def test_sft_overhead_small_is_the_same_computation_as_raw_trl(tiny_model_dir):
    from alignkit import bench

    r = bench.sft_overhead(n_rows=64, steps=4, repeats=1, logging_steps=1, warmup_steps=1)
    for name in ("trl", "alignkit"):
        assert len(r[name]["wall_s"]) == 1 and r[name]["wall_s"][0] > 0
        assert r[name]["median_train_runtime_s"] > 0 and r[name]["tokens_per_s"] > 0
        assert r[name]["steps"] == 4
    assert r["ratio_wall"] > 0
    # same rows, same tokenised inputs (ids + completion masks), same loss at every step
    assert r["rows_identical"] and r["warmup"]["tokenised_inputs_identical"]
    assert r["loss_curves"]["steps_compared"] == [1, 2, 3, 4]
    assert r["loss_curves"]["identical"], r["loss_curves"]
    assert r["loss_curves"]["tokens_identical"] and r["trl"]["num_tokens"] > 0
    assert r["trl"]["bf16"] is False  # fp32 like alignkit on CPU, not TRL's bf16 default
    json.dumps(r, default=str)  # the CLI writes it as JSON


def test_bench_cli_is_registered():
    from alignkit.cli import app

    out = CliRunner().invoke(app, ["bench", "--help"])
    assert out.exit_code == 0 and "sft" in out.output and "quickstart" in out.output


@pytest.mark.slow  # a 2-process launch or a benchmark: `make test-all`
def test_rm_table1_and_rm_scoring_small(tiny_model_dir):
    """Tiny sizes: every Table-1 row has every metric; the scoring bench reports positive rates."""
    from alignkit import bench
    from alignkit.paper_tables.rm_table1 import RM_METRICS, rm_table1

    r = rm_table1("tiny", seeds=(0,), lams=(0.0, 0.1), member_losses=("mean",), n_members=2, pairs=48,
                        epochs=1, lora_r=4, lora_alpha=8, ood_max_samples=8, sft_rows=32)
    assert [x["kind"] for x in r["rows"]] == ["full", "ensemble", "ensemble"]
    for row in r["rows"]:
        for key in RM_METRICS:
            assert key in row and f"{key}_sd" in row
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["ece"] <= 0.5 and row["train_runtime_s"] > 0
        assert len(row["per_seed"]) == 1
    assert r["rows"][0]["trainable_pct"] == 100 and r["rows"][0]["ood_auroc"] is None
    assert 0 < r["rows"][1]["trainable_pct"] < 100 and r["sft_backbone"]["wall_s"] > 0
    # two of the four configurations (each is a fresh subprocess, mostly import time)
    s = bench.rm_scoring("tiny", n_members=2, batch=8, rows=16, repeats=1, configs=("one", "mixed"))
    for name in ("one", "mixed"):
        assert s["configs"][name]["samples_per_s"] > 0 and s["ratios"][name]["throughput_vs_one"] > 0
    json.dumps([r, s], default=str)


@pytest.mark.parametrize("argv, words", [(["--device", "cuda"], ["no CUDA GPU"]),
                                         (["--backbone", "gpt9"], ["--backbone", "random-llama"])])
def test_rm_scoring_bad_device_or_backbone_is_one_line(argv, words, monkeypatch, capsys, tmp_path):
    import torch
    from helpers import one_line_error, run_cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "r.json"
    code, _, err = run_cli(["bench", "rm-scoring", *argv, "--json", str(out)], monkeypatch, capsys)
    one_line_error(code, err, *words)
    assert not out.exists()
