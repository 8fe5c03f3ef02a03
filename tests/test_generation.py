"""alignkit.generation: K samples per prompt, seeding, EOS handling, padding, capture, jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_python_runs, run_cli

from alignkit.arena import JOIN, build_prompts
from alignkit.errors import UserError
from alignkit.generation import check_settings, format_prompt, generate, prompt_ids, write_jsonl
from alignkit.models import load_causal_lm


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    return load_causal_lm(str(tiny_model_dir))


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return [row["prompt"] for row in build_prompts(6, seed=0)]


def _quiet(**kw):
    return {"progress": False, "max_new_tokens": 8, **kw}


def test_k_samples_per_prompt_in_prompt_major_order(tiny, prompts) -> None:
    stats: dict = {}
    out = generate(*tiny, prompts[:3], k=4, batch_size=5, stats=stats, **_quiet())
    assert len(out) == 12
    assert [s.prompt for s in out] == [p for p in prompts[:3] for _ in range(4)]
    assert [s.index for s in out] == [0, 1, 2, 3] * 3
    assert stats["n_samples"] == 12 and stats["samples_per_s"] > 0
    for s in out:
        assert s.n_tokens == len(s.token_ids) <= 8 and (s.finished or s.n_tokens == 8)
        assert s.completion == tiny[1].decode(s.token_ids, skip_special_tokens=True)


def test_sampling_is_deterministic_by_seed(tiny, prompts) -> None:
    model, tok = tiny
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = generate(model, tok, prompts, k=2, seed=7, **_quiet())
    assert torch.equal(torch.rand(1), expected_next)  # the caller's RNG stream is untouched
    b = generate(model, tok, prompts, k=2, seed=7, **_quiet())
    c = generate(model, tok, prompts, k=2, seed=8, **_quiet())
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert [s.token_ids for s in a] != [s.token_ids for s in c]
    assert len({tuple(s.token_ids) for s in a}) > len(prompts)  # the k samples of a prompt differ


def test_greedy_is_deterministic_and_padding_independent(tiny, prompts) -> None:
    model, tok = tiny
    mixed = [prompts[0], prompts[1] + " it was a long day .", "review :", prompts[2]]
    batched = generate(model, tok, mixed, k=2, temperature=0, batch_size=8, **_quiet())
    alone = [s for p in mixed for s in generate(model, tok, [p], temperature=0, seed=99, **_quiet())]
    assert [s.token_ids for s in batched[::2]] == [s.token_ids for s in alone]
    assert [s.token_ids for s in batched[::2]] == [s.token_ids for s in batched[1::2]]
    assert tok.padding_side == "right"  # restored for training


def test_finished_flag_and_eos_cut(tiny, prompts) -> None:
    model, tok = tiny
    one = generate(model, tok, prompts, k=3, max_new_tokens=1, progress=False)
    assert all(s.finished == (s.n_tokens == 0) for s in one)
    # Make EOS likely by declaring ~40% of the vocabulary end-of-sequence tokens.
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, *range(3, 300)]
    try:
        out = generate(model, tok, prompts, k=4, max_new_tokens=6, progress=False)
    finally:
        model.generation_config.eos_token_id = saved
    assert any(s.finished for s in out) and not all(s.finished for s in out)
    for s in out:
        assert all(t >= 300 for t in s.token_ids)  # cut before the first EOS
        assert s.finished or s.n_tokens == 6


def test_captured_hidden_state_matches_a_forward_pass(tiny, prompts) -> None:
    model, tok = tiny
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, *range(3, 200)]  # mix finished/unfinished
    try:
        out = generate(model, tok, prompts, k=3, capture_layer=-1, **_quiet(max_new_tokens=5))
        mid = generate(model, tok, prompts[:2], k=1, capture_layer=1, **_quiet(max_new_tokens=5))
    finally:
        model.generation_config.eos_token_id = saved
    assert {s.finished for s in out} == {True, False}
    for samples, layer in ((out, -1), (mid, 1)):
        for s in samples:
            ids = tok(s.prompt + JOIN).input_ids + s.token_ids
            with torch.no_grad():
                hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0, -1]
            assert s.embedding.shape == (model.config.hidden_size,)
            torch.testing.assert_close(s.embedding, hidden, atol=1e-4, rtol=1e-4)


def test_chat_prompts_use_the_template(tiny) -> None:
    model, tok = tiny
    msgs = [{"role": "user", "content": "write a review ."}]
    assert format_prompt(tok, msgs) == "user: write a review .\nassistant:"
    assert format_prompt(tok, "write a review .", chat=True) == format_prompt(tok, msgs)
    assert format_prompt(tok, "review : hi .") == "review : hi ." + JOIN
    out = generate(model, tok, [msgs], k=2, **_quiet())
    assert out[0].prompt == "user: write a review .\nassistant:"


def test_write_jsonl_is_atomic(tiny, prompts, tmp_path: Path) -> None:
    out = generate(*tiny, prompts[:2], k=2, **_quiet())
    path = write_jsonl(out, tmp_path / "sub" / "samples.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 4 and set(rows[0]) == {"prompt", "completion", "finished", "n_tokens", "index"}
    assert [p.name for p in path.parent.iterdir()] == ["samples.jsonl"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"k": 0}, "--k must be at least 1"),
        ({"temperature": float("nan")}, r"--temperature must be a finite number >= 0 \(got nan\)"),
        ({"temperature": float("inf")}, r"--temperature must be a finite number >= 0 \(got inf\)"),
        ({"top_p": float("nan")}, r"--top-p must be in \(0, 1\] \(got nan\)"),
    ],
)
def test_bad_settings_are_one_line_before_sampling(tiny, prompts, settings, message) -> None:
    with pytest.raises(UserError, match=message):
        check_settings(**settings)
    with pytest.raises(UserError, match=message):
        generate(*tiny, prompts, progress=False, **settings)


def test_temperature_nan_on_the_cli_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "s.jsonl"
    code, _, err = run_cli(["generate", "-m", "tiny", "-p", "builtin:prompts", "--max-samples", "2", "--out", str(out),
                            "--temperature", "nan"], monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "temperature" in lines[0] and "Traceback" not in err, err
    assert not out.exists()


def test_max_new_tokens_is_capped_to_the_models_positions(tiny, prompts, capsys) -> None:
    model, tok = tiny
    limit = model.config.max_position_embeddings  # 256
    longest = max(len(ids) for ids in prompt_ids(tok, prompts[:2]))
    stats: dict = {}
    out = generate(model, tok, prompts[:2], k=1, max_new_tokens=limit + 50, temperature=0, stats=stats,
                   progress=False)
    room = limit - longest
    warning = capsys.readouterr().err
    assert f"max_new_tokens={limit + 50} is beyond the model's {limit} positions" in warning
    assert f"using {room}" in warning and len(warning.strip().splitlines()) == 1
    assert stats["max_new_tokens"] == room and all(s.n_tokens <= room for s in out)
    assert max(s.n_tokens for s in out) == room  # the untrained model never stops: it used every position
    fits = generate(model, tok, prompts[:2], k=1, max_new_tokens=4, temperature=0, stats=stats, progress=False)
    assert stats["max_new_tokens"] == 4 and not capsys.readouterr().err and len(fits) == 2
    with pytest.raises(UserError, match=rf"prompt 1 is \d+ tokens long: the model attends to {limit} positions"):
        generate(model, tok, [prompts[0], "word " * limit], k=1, max_new_tokens=4, progress=False)


def test_the_default_join_is_the_builtin_tasks_and_the_task_is_not_imported() -> None:

    from alignkit import arena, generation

    assert generation.DEFAULT_JOIN == arena.JOIN
    code = ("import sys, alignkit.models, alignkit.generation, alignkit.evaluate; "
            "sys.exit('alignkit.arena' in sys.modules)")
    assert_python_runs(code)
    assert not hasattr(generation, "_generate_vllm")


@pytest.mark.parametrize("layer", [0, 1, 2, -1, -2, -3])
def test_every_layer_is_captured_by_the_hook_as_output_hidden_states_numbers_it(tiny, prompts, layer) -> None:
    """The capture hook keeps one layer's last position per step; its numbering (0 = embeddings, the last =
    after the final norm) must be `output_hidden_states`' for every layer."""
    model, tok = tiny
    hooks = lambda: sum(len(m._forward_hooks) for m in model.modules())  # noqa: E731
    before = hooks()
    out = generate(model, tok, prompts[:2], k=2, capture_layer=layer, **_quiet(max_new_tokens=4))
    assert hooks() == before  # the capture hook is removed
    for s in out:
        ids = tok(s.prompt + JOIN).input_ids + s.token_ids
        with torch.no_grad():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0, -1]
        torch.testing.assert_close(s.embedding, hidden, atol=1e-4, rtol=1e-4)
    with pytest.raises(UserError, match="out of range"):
        generate(model, tok, prompts[:1], k=1, capture_layer=5, **_quiet(max_new_tokens=2))
