"""Chat templates in every sampling path (`--chat auto|on|off`, docs/models.md#chat-templates): the rendered ids
are the tokenizer's own `apply_chat_template` ids, the rollout's teacher-forced forwards read exactly them, and
`--chat on` without a template is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import copy_without_chat_template, one_line_error, run_cli

from alignkit import generation
from alignkit.errors import UserError
from alignkit.models import load_causal_lm
from alignkit.online import rollout

PLAIN = ["review : the food was", "review : our stay"]
MESSAGES = [[{"role": "user", "content": "write a review ."}],
            [{"role": "system", "content": "be kind ."}, {"role": "user", "content": "a hotel ."}]]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    return load_causal_lm(str(tiny_model_dir))


@pytest.fixture(scope="module")
def no_template_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a tokenizer that has no chat template (as base models like gpt2 or opt)."""
    return copy_without_chat_template(tiny_model_dir, tmp_path_factory.mktemp("no-template") / "tiny")


def _template_ids(tok, messages) -> list[int]:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def test_rendered_ids_are_apply_chat_template_ids(tiny) -> None:
    _, tok = tiny
    as_turns = [[{"role": "user", "content": p}] for p in PLAIN]
    for chat in ("auto", "on"):  # the tiny tokenizer has a template: auto renders plain prompts too
        assert generation.prompt_ids(tok, PLAIN, chat=chat) == [_template_ids(tok, m) for m in as_turns]
    for chat in ("auto", "on", "off"):  # message lists have no plain form: always rendered
        assert generation.prompt_ids(tok, MESSAGES, chat=chat) == [_template_ids(tok, m) for m in MESSAGES]
    assert generation.prompt_ids(tok, PLAIN, chat="off") == tok(PLAIN)["input_ids"]  # text, with its BOS
    mixed = generation.prompt_ids(tok, [PLAIN[0], MESSAGES[0]], chat="off")
    assert mixed == [tok(PLAIN[0])["input_ids"], _template_ids(tok, MESSAGES[0])]


def test_auto_needs_a_template_and_leaves_builtin_prompts_as_text(no_template_dir: Path) -> None:
    _, tok = load_causal_lm(str(no_template_dir))
    assert generation.prompt_ids(tok, PLAIN, chat="auto") == tok(PLAIN)["input_ids"]
    assert generation.chat_mode("auto", "builtin:prompts") == "off"  # the built-in task continues text
    assert generation.chat_mode("auto", "prompts.jsonl") == "auto"
    assert generation.chat_mode(True) == "on" and generation.chat_mode(False) == "off"
    with pytest.raises(UserError, match="--chat on needs a tokenizer with a chat template"):
        generation.generate(*load_causal_lm(str(no_template_dir)), PLAIN, chat="on", progress=False)
    with pytest.raises(UserError, match="--chat must be auto, on or off"):
        generation.chat_mode("yes")


def test_rollout_teacher_forcing_reads_the_rendered_ids(tiny) -> None:
    """`rollout.sample` packs exactly the ids `generate` fed, so the teacher-forced log-probs of the rollout
    equal the log-probs of the sampled tokens that `generate` returned (the PPO ratio is 1 at the start)."""
    model, tok = tiny
    kw = dict(k=2, max_new_tokens=6, temperature=1.0, seed=3)
    batch = rollout.sample(model, tok, PLAIN, chat="on", **kw)
    rendered = [_template_ids(tok, [{"role": "user", "content": p}]) for p in PLAIN]
    P = batch.prompt_len
    for row in range(len(batch)):
        fed = batch.input_ids[row, :P][batch.attention_mask[row, :P].bool()].tolist()
        assert fed == rendered[row // 2]
    assert batch.prompts[0].endswith("assistant:")  # the text the model saw
    samples = generation.generate(model, tok, PLAIN, chat="on", progress=False, return_logprobs=True,
                                  batch_size=64, top_p=1.0, **kw)
    assert [s.token_ids for s in samples] == [batch.input_ids[r, P : P + int(batch.lengths[r])].tolist()
                                              for r in range(len(batch))]
    rollout.score_tokens(batch, model, model, None, 1.0, minibatch=8)
    expected = torch.tensor([s.logprob for s in samples], dtype=torch.float64)
    torch.testing.assert_close(batch.logprobs.sum(-1).double(), expected, atol=1e-4, rtol=1e-4)


def test_generate_cli_renders_plain_prompts_and_chat_on_without_template_is_one_line(
        tiny_model_dir: Path, no_template_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PLAIN))
    base = ["generate", "--prompts", str(prompts), "--max-new-tokens", "4", "--device", "cpu"]
    code, _, err = run_cli([*base, "--model", str(tiny_model_dir), "--out", str(tmp_path / "a.jsonl")],
                           monkeypatch, capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [f"user: {p}\nassistant:" for p in PLAIN]  # auto: the template
    code, _, err = run_cli([*base, "--model", str(tiny_model_dir), "--out", str(tmp_path / "b.jsonl"),
                            "--chat", "off"], monkeypatch, capsys)
    assert code == 0, err
    assert [json.loads(line)["prompt"] for line in (tmp_path / "b.jsonl").read_text().splitlines()] == PLAIN
    out = tmp_path / "c.jsonl"
    code, _, err = run_cli([*base, "--model", str(no_template_dir), "--out", str(out), "--chat", "on"],
                           monkeypatch, capsys)
    one_line_error(code, err, "--chat on", "chat template")
    assert not out.exists()
    code, _, err = run_cli([*base, "--model", str(tiny_model_dir), "--out", str(out), "--chat", "maybe"],
                           monkeypatch, capsys)
    one_line_error(code, err, "--chat")


@pytest.mark.parametrize("command", ["ppo", "sppo"])
def test_online_loops_read_the_chat_setting(command: str, no_template_dir: Path, tmp_path: Path) -> None:
    """`ppo.chat` / `sppo.chat`: `on` with a template-less tokenizer stops before the run directory exists."""
    from alignkit.trainers import ppo
    from alignkit.trainers.sppo import SPPOConfig, run

    common = dict(model={"name": str(no_template_dir), "device": "cpu"}, data={"source": "builtin:prompts"},
                  output={"dir": str(tmp_path / "run")})
    if command == "ppo":
        cfg, run_fn = ppo.PPOConfig(**common, ppo={"chat": "on", "iterations": 1}), ppo.run
    else:
        cfg, run_fn = SPPOConfig(**common, sppo={"chat": "on", "iterations": 1, "eval_prompts": 2}), run
    with pytest.raises(UserError, match="--chat on needs a tokenizer with a chat template"):
        run_fn(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("module, cls", [("alignkit.trainers.ppo", "PPOSection"),
                                         ("alignkit.trainers.sppo.config", "SPPOSection"),
                                         ("alignkit.evaluate", "PolicyEvalConfig"),
                                         ("alignkit.pipeline", "PairsSection"),
                                         ("alignkit.trainers.qprobe.config", "CollectConfig")])
def test_unquoted_yaml_on_off_is_the_chat_mode_everywhere(module: str, cls: str) -> None:
    """YAML reads `chat: off` as false: every config that samples takes it as `off` (one shared type)."""
    import importlib

    import yaml

    config = getattr(importlib.import_module(module), cls)
    required = {"policies": {"sft": "tiny"}} if cls == "PolicyEvalConfig" else {}
    for text, mode in (("chat: off", "off"), ("chat: on", "on"), ("chat: auto", "auto")):
        assert config(**required, **yaml.safe_load(text)).chat == mode
    with pytest.raises(ValueError, match="chat"):
        config(**required, chat="maybe")
