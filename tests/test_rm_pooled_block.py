"""The reward ensemble's pooled last block (alignkit/pooled_block.py): the last transformer block run
at the position the reward is read from gives the full forward's rewards and gradients, in every
forward mode, for the tiny Llama and small random BERT / Mistral / Qwen2 classifiers; any other
model keeps the full forward."""

from __future__ import annotations

import pytest
import torch

from alignkit import models
from alignkit.reward_models import layer_list
from alignkit.rewards import RewardEnsemble

MODES = ("mixed", "loop", "shared", "shared-loop")
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_LINEAR = ["query", "key", "value", "dense"]


def _members_differ(ens: RewardEnsemble) -> RewardEnsemble:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero (members identical): make the members differ
        for name, p in ens.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return ens


def _ensemble(base: str, targets: list[str] | None, layers, monkeypatch=None, model=None) -> RewardEnsemble:
    """An N = 3 ensemble on `base`, or on the in-memory `model` (load_sequence_classifier patched)."""
    if model is not None:
        monkeypatch.setattr(models, "load_sequence_classifier", lambda *a, **k: (model, None))
    ens = RewardEnsemble.build(base, n_members=3, lora=models.LoraSpec(r=4, alpha=8, dropout=0.0,
                               target_modules=targets), device="cpu", layers_to_transform=layers)
    return _members_differ(ens)


def _right_padded(vocab: int, pad: int, lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=gen)
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids.masked_fill(mask == 0, pad), "attention_mask": mask}


def _rewards_and_grads(ens: RewardEnsemble, batch: dict, mode: str, pooled) -> tuple[torch.Tensor, list]:
    ens.pooled_block = pooled
    ens.model.zero_grad()
    rewards = ens(**batch, mode=mode)
    weights = torch.linspace(-1.0, 2.0, rewards.numel()).view_as(rewards)  # every reward a different weight
    (rewards * weights).sum().backward()
    return rewards.detach(), [p.grad.clone() for p in ens.member_parameters()]


def _assert_pooled_equals_full(ens: RewardEnsemble, batch: dict, modes=MODES) -> None:
    pooled = ens.pooled_block
    assert pooled is not None
    block = layer_list(ens.model.get_base_model())[-1]
    query = next(m for name, m in block.named_modules() if name.endswith(("q_proj", "attention.self.query")))
    seen: list[tuple[int, ...]] = []
    handle = query.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape[:2])))
    try:
        for mode in modes:
            seen.clear()
            full, full_grads = _rewards_and_grads(ens, batch, mode, None)
            fast, fast_grads = _rewards_and_grads(ens, batch, mode, pooled)
            assert full.std(dim=0).mean() > 1e-3  # the members differ
            assert (fast - full).abs().max() < 1e-5, mode
            assert len(full_grads) == len(fast_grads) > 0
            assert all(g.abs().sum() > 0 for g in full_grads), mode  # every LoRA and head gets a gradient
            for a, b in zip(full_grads, fast_grads):
                assert (a - b).abs().max() < 1e-5 * max(1.0, a.abs().max().item()), mode
            # the full forward queried every position of the last block, the pooled one a single one
            rows = batch["input_ids"].shape[0]
            assert all(s[1] == batch["input_ids"].shape[1] for s in seen[: len(seen) // 2]), mode
            assert all(s[1] == 1 for s in seen[len(seen) // 2:]) and seen[-1][0] in (rows, 3 * rows), mode
    finally:
        handle.remove()
        ens.pooled_block = pooled


@pytest.mark.parametrize("layers", [[-1], None])
def test_tiny_llama_pooled_last_block_equals_full_forward(layers, tiny_model_dir):
    ens = _ensemble("tiny", LLAMA_LINEAR, layers)
    assert ens.pooled_block is not None and ens.pooled_block.family == "decoder"
    tok = ens.tokenizer
    texts = ["a", "the quick brown fox jumps", "hi there", "one two three four five six seven eight"]
    batch = ens.encode(texts)  # right padding, four different lengths
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 4 and (batch["input_ids"][0, lengths[0]:] == tok.pad_token_id).all()
    _assert_pooled_equals_full(ens, batch)


def test_tiny_llama_pooled_position_is_the_last_non_pad_token(tiny_model_dir):
    """transformers reads the rightmost token that is not the pad token, whatever the mask says: a
    left-padded row, and a row whose text ends in pad-token ids it attends to (pad = eos)."""
    ens = _ensemble("tiny", LLAMA_LINEAR, [-1])
    pad = ens.tokenizer.pad_token_id
    ids = torch.tensor([[5, 6, 7, pad, pad, pad], [5, 6, 7, 8, 9, 10], [pad, pad, 5, 6, 7, 8],
                        [5, 6, 7, 8, pad, pad]])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    assert ens.pooled_block.positions(ids).tolist() == [2, 5, 5, 3]
    _assert_pooled_equals_full(ens, {"input_ids": ids, "attention_mask": mask}, modes=("mixed", "shared-loop"))


def _bert(**overrides):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32, num_labels=1, pad_token_id=0,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2,
                     **overrides)
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("layers", [[-1], [-2, -1]])
def test_small_bert_pooled_last_block_equals_full_forward(layers, monkeypatch):
    ens = _ensemble("random-bert", BERT_LINEAR, layers, monkeypatch, _bert())
    assert ens.pooled_block is not None and ens.pooled_block.family == "bert"
    assert ens.shared_layers == 3 + layers[0]
    _assert_pooled_equals_full(ens, _right_padded(64, 0, [5, 11, 8, 3]))


def _decoder(kind: str, **overrides):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.for_model(kind, vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               num_labels=1, pad_token_id=0, initializer_range=0.2, **overrides)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(cfg).eval()


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_grouped_query_decoders_pooled_last_block_equals_full_forward(kind, monkeypatch):
    """Mistral and Qwen2 (two key/value heads for four query heads, Qwen2's q/k/v biases)."""
    ens = _ensemble(f"random-{kind}", LLAMA_LINEAR, [-1], monkeypatch, _decoder(kind, sliding_window=None))
    assert ens.pooled_block is not None and ens.pooled_block.family == "decoder"
    _assert_pooled_equals_full(ens, _right_padded(64, 0, [6, 13, 9, 2]), modes=("shared", "shared-loop"))


def _every_position_head():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    class EveryPositionHead(LlamaForSequenceClassification):  # a head that reads all positions
        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            out = self.model(input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
            logits = self.score(out).mean(dim=1)
            return type("Out", (), {"logits": logits})()

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=64, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    return EveryPositionHead(cfg).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=1, pad_token_id=0)
    return GPT2ForSequenceClassification(cfg).eval()


UNSUPPORTED = {
    "head reads every position": _every_position_head,
    "sliding window": lambda: _decoder("mistral", sliding_window=4),
    "bert as a decoder": lambda: _bert(is_decoder=True),
    "gpt2": _gpt2,
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_models_keep_the_full_forward(case, monkeypatch):
    model = UNSUPPORTED[case]()
    targets = ["c_attn"] if case == "gpt2" else (BERT_LINEAR if "bert" in case else ["q_proj", "v_proj"])
    ens = _ensemble("random-x", targets, None, monkeypatch, model)
    assert ens.pooled_block is None
    batch = _right_padded(64, 0, [4, 7, 2])
    with torch.no_grad():
        rewards = ens(**batch, mode="mixed")
        ens.model.eval().set_adapter("m1")
        m1 = ens.model(**batch).logits.view(-1)  # member 1 through the model's own forward
        ens.model.set_adapter("m0")
    assert rewards.shape == (3, 3) and (rewards[1] - m1).abs().max() < 1e-5
