"""alignkit.models: aliases, the built-in tiny model, minilm, safetensors policy, dtype, LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignkit.errors import UserError
from alignkit.models import (
    ALIASES,
    LoraSpec,
    apply_lora,
    build_tiny,
    choose_device,
    choose_dtype,
    list_models,
    load_causal_lm,
    load_encoder,
    load_sequence_classifier,
    load_tokenizer,
    resolve,
    trainable_parameters,
)


def test_tiny_build_is_deterministic(tiny_model_dir: Path, tmp_path: Path) -> None:
    other = build_tiny(tmp_path)
    assert other != tiny_model_dir and other.name == tiny_model_dir.name  # same recipe hash
    assert (other / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_text() == (tiny_model_dir / "tokenizer.json").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp sibling cleaned up


def test_tiny_is_built_once_and_is_what_tiny_resolves_to(tiny_model_dir: Path, alignkit_cache: Path) -> None:
    weights = tiny_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_tiny(alignkit_cache) == tiny_model_dir
    assert weights.stat().st_mtime_ns == before
    assert Path(resolve("tiny")) == tiny_model_dir  # default root is $ALIGNKIT_CACHE


def test_tiny_model_spec_and_loading(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 2
    assert config["hidden_size"] == 128 and config["tie_word_embeddings"] is True
    assert not list(tiny_model_dir.glob("*.bin"))
    model, tok = load_causal_lm("tiny")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert next(model.parameters()).dtype == torch.float32
    assert 512 <= len(tok) <= 1024 and model.config.vocab_size == len(tok)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert model.config.pad_token_id == tok.pad_token_id
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "user: hi\nassistant:"


def test_tiny_tokenizer_round_trips_and_keeps_the_join_boundary(tiny_model_dir: Path) -> None:
    from alignkit.arena import JOIN, build_sft

    tok = load_tokenizer("tiny")
    for row in build_sft(200, seed=3):
        full = row["prompt"] + JOIN + row["completion"]
        ids = tok(full).input_ids
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == full
        # prompt and completion tokenized apart == tokenized together (SFT/DPO masks stay exact)
        assert (
            tok(row["prompt"] + JOIN).input_ids + tok(row["completion"], add_special_tokens=False).input_ids
            == ids
        )


def test_aliases_resolve() -> None:
    assert resolve("mistral-7b") == "mistralai/Mistral-7B-Instruct-v0.2"
    assert resolve("codellama-7b") == "codellama/CodeLlama-7b-hf"
    assert resolve("some-org/some-model") == "some-org/some-model"
    assert (Path(resolve("minilm")) / "model.safetensors").is_file()
    assert {a.kind for a in ALIASES.values()} <= {"causal", "seq2seq", "encoder", "pairwise"}
    rows = {r["name"]: r for r in list_models()}
    assert rows.keys() == ALIASES.keys()
    assert rows["tiny"]["available"] and rows["minilm"]["available"]
    assert rows["gpt-j-6b"]["source"] == "EleutherAI/gpt-j-6b"


def test_local_directory_resolves_to_itself(tiny_model_dir: Path) -> None:
    assert resolve(str(tiny_model_dir)) == str(tiny_model_dir)


def test_unknown_alias_offline_is_one_line_with_suggestion() -> None:
    with pytest.raises(UserError, match=r'offline\?\).*did you mean "mistral-7b"') as err:
        load_causal_lm("mistrall-7b")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="model 'nobody/nothing' is not a local directory or built-in"):
        load_tokenizer("nobody/nothing")


def test_directories_without_safetensors_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        resolve(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="no config.json"):
        load_causal_lm(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UserError, match=r"only pickled \.bin weights"):
        load_causal_lm(str(tmp_path))


def test_minilm_embeds_similar_sentences_closer() -> None:
    enc = load_encoder("minilm")
    emb = enc.embed(["the film was wonderful", "the movie was great", "my kettle is broken"], batch_size=2)
    assert emb.shape == (3, 384)
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2] + 0.2


def test_sequence_classifier_heads(tiny_model_dir: Path) -> None:
    model, tok = load_sequence_classifier("minilm")
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    batch = tok(["good", "a much longer bad sentence"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 1)
    model, tok = load_sequence_classifier("tiny", lora=LoraSpec(r=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable)  # peft trains the new reward head too


def test_lora_trains_only_adapters(tiny_model_dir: Path) -> None:
    model, _ = load_causal_lm("tiny")
    total_before = trainable_parameters(model)[1]
    model = apply_lora(model, LoraSpec(r=4, alpha=8))
    trainable, total = trainable_parameters(model)
    assert 0 < trainable / total < 0.1 and total > total_before
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    peft_cfg = LoraSpec(target_modules=["q_proj", "v_proj"]).to_peft("CAUSAL_LM")
    assert (
        peft_cfg.r == 8 and peft_cfg.lora_alpha == 16 and set(peft_cfg.target_modules) == {"q_proj", "v_proj"}
    )
    with pytest.raises(UserError, match="lora.r"):
        LoraSpec(r=0)


def test_dtype_and_device_rules() -> None:
    assert choose_dtype("auto", "cpu") == torch.float32
    assert choose_dtype("bf16", "cpu") == torch.bfloat16 and choose_dtype("float16") == torch.float16
    with pytest.raises(UserError, match="model.dtype 'fp8'"):
        choose_dtype("fp8")
    assert choose_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert choose_device("auto").type == "cpu"
        with pytest.raises(UserError, match="no CUDA GPU"):
            choose_device("cuda")


def test_placement_and_encoder_names_are_reexported_by_the_loader() -> None:
    """`from alignkit.models import choose_device` (and the rest of placement.py's and encoders.py's
    public names) keeps working for the modules and users that import them from the loader."""
    from alignkit import encoders, models, placement

    for name in ("choose_device", "choose_dtype", "launch_placement", "Placement", "LoadPlan", "plan_loading",
                 "check_load_in_4bit", "quantization_config", "training_dtype", "QLORA_HINT"):
        assert getattr(models, name) is getattr(placement, name), name
    for name in ("Encoder", "mean_pool", "load_encoder"):
        assert getattr(models, name) is getattr(encoders, name), name


def test_max_positions_reads_the_config_names_in_use() -> None:
    from types import SimpleNamespace

    from alignkit.models import max_positions

    assert max_positions(SimpleNamespace(config=SimpleNamespace(max_position_embeddings=256))) == 256
    assert max_positions(SimpleNamespace(n_positions=1024)) == 1024  # GPT-2 names it so; a bare config works too
    assert max_positions(SimpleNamespace(config=SimpleNamespace())) is None  # unknown: nothing is capped
