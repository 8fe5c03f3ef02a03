"""alignkit.evaluate (`alignkit eval`): generation-time log-probs, KL, win rate, run directory, CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import run_cli

from alignkit.arena import build_prompts
from alignkit.errors import UserError
from alignkit.evaluate import (
    PolicyEvalConfig,
    evaluate_policies,
    hard_wins,
    mean_se,
    parse_policies,
    plot,
    run,
    sequence_logprobs,
)
from alignkit.generation import generate, prompt_ids
from alignkit.models import load_causal_lm


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return [row["prompt"] for row in build_prompts(16, seed=3)]


def test_generation_logprob_equals_a_teacher_forced_forward(tiny_model_dir, prompts) -> None:
    model, tok = load_causal_lm(str(tiny_model_dir), dtype="float32", device="cpu")
    mixed = [*prompts[:4], "review :"]  # different lengths: left padding in the batch
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, *range(3, 120)]  # finished and unfinished
    try:
        out = generate(model, tok, mixed, k=3, max_new_tokens=8, temperature=1.0, progress=False,
                       return_logprobs=True, capture_layer=-1)  # both options on at once
    finally:
        model.generation_config.eos_token_id = saved
    assert {s.finished for s in out} == {True, False}
    pids = prompt_ids(tok, mixed)
    full = [s.token_ids + ([s.eos_token_id] if s.finished else []) for s in out]
    for i, s in enumerate(out):
        assert s.finished == (s.eos_token_id is not None) and (not s.finished or s.eos_token_id in range(3, 120)
                                                              or s.eos_token_id == tok.eos_token_id)
        ids = pids[i // 3] + full[i]
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        start = len(pids[i // 3])
        expected = sum(logp[start - 1 + t, ids[start + t]].item() for t in range(len(full[i])))
        assert s.logprob == pytest.approx(expected, abs=1e-4)
        assert s.embedding is not None
    # the batched, left-padded reference forward of evaluate gives the same numbers
    batched = sequence_logprobs(model, [pids[i // 3] for i in range(len(out))], full, batch_size=4,
                                pad_id=tok.pad_token_id)
    np.testing.assert_allclose(batched, [s.logprob for s in out], atol=1e-4)
    assert "logprob" in out[0].to_json() and "eos_token_id" not in out[0].to_json()
    plain = generate(model, tok, mixed[:1], k=1, max_new_tokens=4, progress=False)[0]  # option off: as before
    assert plain.logprob is None and set(plain.to_json()) == {"prompt", "completion", "finished", "n_tokens", "index"}


def test_estimators_by_hand() -> None:
    v = np.array([1.0, 3.0, 5.0, 7.0])  # 2 prompts x 2: per-prompt means 2 and 6
    assert mean_se(v, 2, 2) == pytest.approx((4.0, np.std([2, 6], ddof=1) / np.sqrt(2)))
    assert mean_se(v, 1, 4) == pytest.approx((4.0, np.std(v, ddof=1) / 2))
    assert mean_se(np.array([2.0]), 1, 1) == (2.0, None)
    assert hard_wins(np.array([0.9, 0.5, 0.1])).tolist() == [1.0, 0.5, 0.0]
    assert parse_policies(["tiny", "sft=runs/a", "runs/b/"]) == {"tiny": "tiny", "sft": "runs/a", "runs/b": "runs/b/"}
    with pytest.raises(UserError, match="given twice"):
        parse_policies(["a=tiny", "a=tiny"])


@pytest.fixture(scope="module")
def sft_vs_tiny(sft_tiny_dir, tiny_model_dir, prompts) -> dict:
    return evaluate_policies({"sft": str(sft_tiny_dir), "tiny": str(tiny_model_dir)}, prompts, baseline="tiny", k=2,
                    max_new_tokens=24, device="cpu", progress=False)


def test_kl_to_itself_is_zero_and_sft_drifts(sft_vs_tiny) -> None:
    res = sft_vs_tiny
    assert res["settings"]["reference"] == "tiny" and res["settings"]["kl_exact_in_expectation"]
    tiny_rows = [r for r in res["samples"] if r["policy"] == "tiny"]
    assert all(abs(r["logprob"] - r["ref_logprob"]) < 1e-3 for r in tiny_rows)  # same weights: float error
    assert abs(res["policies"]["tiny"]["kl"]) < 1e-4
    sft = res["policies"]["sft"]
    assert sft["kl"] > 5.0 and sft["kl"] > 5 * sft["kl_se"]  # clearly > 0


def test_sft_beats_untrained_on_reward_and_win_rate(sft_vs_tiny) -> None:
    sft, tiny = sft_vs_tiny["policies"]["sft"], sft_vs_tiny["policies"]["tiny"]
    assert sft["reward_mean"] > tiny["reward_mean"] + 0.5
    assert sft["win_rate"] > 0.5 + 2 * sft["win_rate_se"] and sft["hard_win_rate"] > 0.5
    assert tiny["is_baseline"] and tiny["win_rate"] == 0.5 and tiny["hard_win_rate"] == 0.5  # honest, by pairing
    assert sft["eos_rate"] > tiny["eos_rate"]
    assert len(sft_vs_tiny["samples"]) == 2 * 16 * 2


def test_run_writes_the_run_directory_and_refuses_an_existing_one(sft_tiny_dir, tmp_path) -> None:
    out = tmp_path / "ev"
    cfg = PolicyEvalConfig(policies={"sft": str(sft_tiny_dir), "tiny": "tiny"}, max_samples=4, k=2, max_new_tokens=8,
                     baseline="tiny", device="cpu", output={"dir": str(out)})
    summary = run(cfg, progress=False)
    assert summary["output_dir"] == str(out)
    saved = json.loads((out / "summary.json").read_text())
    assert {"command", "settings", "policies", "finished_at"} <= set(saved)
    assert set(saved["policies"]) == {"sft", "tiny"}
    assert {"reward_mean", "reward_sd", "reward_se", "win_rate", "win_rate_se", "hard_win_rate", "kl", "kl_se",
            "mean_length", "eos_rate", "repetition_rate"} <= set(saved["policies"]["sft"])
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4 * 2
    assert {"policy", "prompt", "completion", "reward", "finished", "logprob", "ref_logprob"} <= set(rows[0])
    assert (out / "plots" / "reward_vs_kl.png").stat().st_size > 0
    assert (out / "config.yaml").is_file() and not out.with_name("ev.partial").exists()
    before = (out / "summary.json").read_text()
    with pytest.raises(UserError, match="already exists"):
        run(cfg, progress=False)
    assert (out / "summary.json").read_text() == before


def test_plot_without_reference_draws_bars(tmp_path) -> None:
    rows = {"a": {"reward_mean": 0.1, "reward_se": 0.02}, "b": {"reward_mean": -0.3, "reward_se": None}}
    path = plot(rows, {"reference_spec": None, "reward": "gold"}, tmp_path / "p.png")
    assert path.stat().st_size > 0


def test_api_rejects_bad_input(prompts) -> None:
    with pytest.raises(UserError, match="no policies"):
        evaluate_policies({}, prompts, progress=False)
    with pytest.raises(UserError, match="--k must be at least 1"):
        evaluate_policies({"tiny": "tiny"}, prompts, k=0, progress=False)
    with pytest.raises(UserError, match="no prompts"):
        evaluate_policies({"tiny": "tiny"}, [], progress=False)
    with pytest.raises(UserError, match="does not exist"):
        evaluate_policies({"x": "/nonexistent/model"}, prompts, progress=False)


_cli = run_cli


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--k", "0"], "k: Input should be greater than or equal to 1"),
        (["--temperature", "-1"], "temperature"),
        (["--baseline", "tiny", "--preference", "no-such-preference"], "preference 'no-such-preference'"),
        (["--reward", "no-such-reward"], "reward 'no-such-reward'"),
        (["--prompts", "/nonexistent/prompts.jsonl"], "prompts.jsonl"),
        (["--prompts", "NOCOL"], "prompt"),
        (["--baseline", "/nonexistent/model"], "/nonexistent/model"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2_nothing_written(extra, message, tmp_path, monkeypatch, capsys) -> None:
    nocol = tmp_path / "nocol.jsonl"
    nocol.write_text('{"question": "a", "answer": "b"}\n')
    out = tmp_path / "ev"
    argv = ["eval", "tiny", "--max-samples", "2", "-o", str(out), *[str(nocol) if a == "NOCOL" else a for a in extra]]
    code, _, err = _cli(argv, monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert message in lines[0]
    assert "Traceback" not in err
    assert not out.exists() and not out.with_name("ev.partial").exists()


def test_cli_runs_and_names_policies(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "ev"
    code, stdout, _ = _cli(["eval", "base=tiny", "--max-samples", "2", "--k", "1", "--max-new-tokens", "4",
                            "--device", "cpu", "-o", str(out)], monkeypatch, capsys)
    assert code == 0 and "base" in stdout
    saved = json.loads((out / "summary.json").read_text())
    assert list(saved["policies"]) == ["base"] and saved["settings"]["reference"] is None
    assert "win_rate" not in saved["policies"]["base"] and "kl" not in saved["policies"]["base"]
    assert (out / "plots" / "reward_vs_kl.png").stat().st_size > 0
    code, _, _ = _cli(["eval", "--help"], monkeypatch, capsys)
    assert code == 0


def test_a_checkpoint_that_reshapes_sampling_makes_the_kl_inexact(tiny_model_dir, tmp_path, prompts) -> None:
    """A generation_config with a repetition penalty samples from something other than π: the summary says so."""
    model, tok = load_causal_lm(str(tiny_model_dir), device="cpu")
    model.generation_config.repetition_penalty = 1.3
    shaped = tmp_path / "shaped"
    model.save_pretrained(shaped)
    tok.save_pretrained(shaped)
    plain = evaluate_policies({"tiny": str(tiny_model_dir)}, prompts[:2], baseline=str(tiny_model_dir), k=2,
                     max_new_tokens=4, progress=False)
    assert plain["settings"]["kl_exact_in_expectation"] and not plain["settings"]["warnings"]
    res = evaluate_policies({"shaped": str(shaped)}, prompts[:2], baseline=str(tiny_model_dir), k=2, max_new_tokens=4,
                   progress=False)
    assert not res["settings"]["kl_exact_in_expectation"]
    assert any("repetition_penalty=1.3" in w for w in res["settings"]["warnings"])


def _refuse_models(monkeypatch) -> None:
    """Make loading any policy fail loudly: what is checked must be checked before that."""
    from alignkit import models

    def no_model(*args, **kwargs):
        raise AssertionError("a policy was loaded before the inputs were checked")

    monkeypatch.setattr(models, "load_causal_lm", no_model)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--preference", "oracle:abc"], "preference 'oracle:abc'"),  # no baseline uses it: still checked
        (["--preference", "oracle:-1"], "preference 'oracle:-1'"),
        (["--preference", "no_such_module_x:judge"], "cannot import module 'no_such_module_x'"),
        (["--reward", "no_such_module_x:reward"], "cannot import module 'no_such_module_x'"),
        (["--reward", "json:no_such_function"], "module 'json' has no function 'no_such_function'"),
        (["--seed", "-1"], "seed"),
    ],
)
def test_bad_specs_and_seed_are_one_line_before_any_policy_is_loaded(extra, message, tmp_path, monkeypatch,
                                                                     capsys) -> None:
    _refuse_models(monkeypatch)
    out = tmp_path / "ev"
    code, _, err = _cli(["eval", "tiny", "--max-samples", "2", "-o", str(out), *extra], monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert not out.exists() and not out.with_name("ev.partial").exists()


def test_a_broken_policy_directory_stops_eval_before_any_sampling(tiny_model_dir, tmp_path, monkeypatch,
                                                                  capsys) -> None:
    import shutil

    broken = shutil.copytree(tiny_model_dir, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"garbage")
    _refuse_models(monkeypatch)
    code, _, err = _cli(["eval", "tiny", str(broken), "--max-samples", "2", "-o", str(tmp_path / "ev")],
                        monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and str(broken) in lines[0] and "safetensors" in lines[0], err


def test_an_output_dir_under_a_file_is_one_line_before_any_policy_is_loaded(tmp_path, monkeypatch, capsys) -> None:
    afile = tmp_path / "a-file"
    afile.write_text("mine")
    _refuse_models(monkeypatch)
    code, _, err = _cli(["eval", "tiny", "--max-samples", "2", "-o", str(afile / "ev")], monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err and str(afile) in lines[0], err
    assert afile.read_text() == "mine"


def test_max_new_tokens_beyond_the_positions_is_capped_and_said(tiny_model_dir, prompts, capsys) -> None:
    res = evaluate_policies({"tiny": str(tiny_model_dir)}, prompts[:1], k=1, max_new_tokens=300, temperature=0,
                            device="cpu", progress=False)
    assert "beyond the model's 256 positions" in capsys.readouterr().err
    (warning,) = res["settings"]["warnings"]
    assert "max_new_tokens capped at" in warning
    assert res["policies"]["tiny"]["mean_length"] < 256
