"""alignkit.rewards: the LoRA reward ensemble, scorers and preferences, on the built-in tiny model."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from helpers import assert_python_runs

from alignkit import arena, models
from alignkit.errors import UserError
from alignkit.rewards import (
    BTPreference,
    EnsembleScorer,
    FunctionScorer,
    OraclePreference,
    RewardEnsemble,
    RewardModelScorer,
    Scores,
    check_preference_spec,
    check_scorer_spec,
    load_preference,
    load_scorer,
)

LORA = models.LoraSpec(r=4, alpha=8, dropout=0.0)


@pytest.fixture(scope="module")
def pairs():
    rows = arena.build_pairwise_offline(16)
    return [r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows]


def _ensemble(tiny_model_dir, n=3) -> RewardEnsemble:
    return RewardEnsemble.build(str(tiny_model_dir), n_members=n, lora=LORA, seeds=[11, 22, 33][:n], device="cpu")


def _perturb_b(ens: RewardEnsemble, scale: float = 0.1) -> None:
    """LoRA B starts at zero (members identical); give every member a different non-zero B."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ens.model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def _batch(ens: RewardEnsemble, prompts, completions):
    return ens.encode([p + c for p, c in zip(prompts, completions)])


def test_build_train_diversifies_members_and_keeps_base_frozen(tiny_model_dir, pairs):
    ens = _ensemble(tiny_model_dir)
    a_by_module = ens.lora_A_by_module()
    assert len(a_by_module) == 14  # 7 linear layers x 2 Llama blocks
    assert all(len(members) == 3 for members in a_by_module)
    assert not torch.equal(a_by_module[0][0], a_by_module[0][1])  # seeded differently
    # only LoRA weights and the members' own head copies train
    trainable = [n for n, p in ens.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert {n.split("modules_to_save.")[1] for n in trainable if "modules_to_save" in n} == {
        "m0.weight",
        "m1.weight",
        "m2.weight",
    }
    t, total = ens.trainable_parameters()
    assert 0 < t < total
    base = {n: p.detach().clone() for n, p in ens.model.named_parameters() if not p.requires_grad}

    prompts, chosen, rejected = pairs
    scores = EnsembleScorer(ens, mode="mixed").score(prompts, chosen)
    assert torch.allclose(scores.members[0], scores.members[1]) and torch.allclose(scores.members[0], scores.members[2])
    assert scores.uncertainty.abs().max() < 1e-6  # B = 0: identical members at step 0

    opt = torch.optim.AdamW([p for p in ens.parameters() if p.requires_grad], lr=1e-2)
    batch_w, batch_l = _batch(ens, prompts, chosen), _batch(ens, prompts, rejected)
    for _ in range(5):  # Bradley-Terry on the ensemble mean (UP-RLHF eq. 12 without NNM)
        loss = -torch.nn.functional.logsigmoid(ens(**batch_w).mean(0) - ens(**batch_l).mean(0)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = EnsembleScorer(ens, mode="loop").score(prompts, chosen)
    assert after.uncertainty.min() > 1e-4
    assert not torch.allclose(after.members[0], after.members[1])
    assert all(torch.equal(p, base[n]) for n, p in ens.model.named_parameters() if n in base)


def test_mixed_and_loop_agree_on_rewards_and_gradients(tiny_model_dir, pairs):
    ens = _ensemble(tiny_model_dir)
    _perturb_b(ens)
    batch = _batch(ens, pairs[0][:6], pairs[1][:6])
    weights = torch.linspace(-1, 1, 18).view(3, 6)  # a loss that weighs every member and item differently
    grads, rewards = {}, {}
    for mode in ("mixed", "loop"):
        ens.zero_grad(set_to_none=True)
        r = ens(**batch, mode=mode)
        (r * weights).sum().backward()
        rewards[mode] = r.detach()
        grads[mode] = {n: p.grad.clone() for n, p in ens.model.named_parameters() if p.requires_grad}
    assert rewards["mixed"].shape == (3, 6)
    torch.testing.assert_close(rewards["mixed"], rewards["loop"], atol=1e-5, rtol=0)
    assert grads["mixed"].keys() == grads["loop"].keys()
    for name, g in grads["mixed"].items():
        assert g.abs().sum() > 0, name  # every member's lora_A, lora_B and head gets a gradient
        torch.testing.assert_close(g, grads["loop"][name], atol=1e-5, rtol=1e-4)
    # the loop restored every member's requires_grad (set_adapter freezes the inactive ones)
    assert all(p.requires_grad for p in ens.member_parameters())


def test_save_load_roundtrip_and_plain_peft_members(tiny_model_dir, pairs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    ens = _ensemble(tiny_model_dir)
    _perturb_b(ens)
    out = ens.save(tmp_path / "ens", {"note": "test"})
    info = json.loads((out / "ensemble.json").read_text())
    assert info["members"] == ["m0", "m1", "m2"] and info["seeds"] == [11, 22, 33]
    assert info["metadata"] == {"note": "test"} and info["lora"]["r"] == 4
    assert info["base"] == str(tiny_model_dir) and info["base_path"] == str(tiny_model_dir)

    prompts, chosen, _ = pairs
    before = ens.score(prompts, chosen)
    loaded = RewardEnsemble.load(out, device="cpu")
    torch.testing.assert_close(loaded.score(prompts, chosen), before, atol=1e-6, rtol=0)
    assert all(p.requires_grad for p in loaded.member_parameters())

    # each member is a standard peft adapter; as a plain reward model it scores like its ensemble row
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    member = PeftModel.from_pretrained(base, out / "members" / "m1")
    single = RewardModelScorer(member, ens.tokenizer).score(prompts, chosen)
    torch.testing.assert_close(single.mean, before[1], atol=1e-5, rtol=0)
    via_spec = load_scorer(str(out / "members" / "m2"), device="cpu").score(prompts, chosen)
    torch.testing.assert_close(via_spec.mean, before[2], atol=1e-5, rtol=0)


def test_load_refuses_members_of_another_base(tiny_model_dir, tmp_path):
    out = _ensemble(tiny_model_dir, n=2).save(tmp_path / "ens")
    with pytest.raises(UserError, match="members/m0' was trained on base .* not on 'minilm'"):
        RewardEnsemble.load(out, device="cpu", base="minilm")
    # same name, wrong shapes: pretend the members were trained on MiniLM
    minilm = str(models.minilm_dir())
    for m in ("m0", "m1"):
        cfg = out / "members" / m / "adapter_config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "base_model_name_or_path": minilm}))
    with pytest.raises(UserError, match="members/m0' does not fit base 'minilm'"):
        RewardEnsemble.load(out, device="cpu", base="minilm")
    with pytest.raises(UserError, match="no ensemble.json"):
        RewardEnsemble.load(tmp_path, device="cpu")


def test_ensemble_needs_two_members(tiny_model_dir):
    with pytest.raises(UserError, match="n_members >= 2"):
        RewardEnsemble.build(str(tiny_model_dir), n_members=1, lora=LORA, device="cpu")
    with pytest.raises(UserError, match="2 seeds for 3 members"):
        RewardEnsemble.build(str(tiny_model_dir), n_members=3, lora=LORA, seeds=[1, 2], device="cpu")


def test_reward_model_scorer_shapes_and_padding_invariance(tiny_model_dir, pairs, tmp_path):
    model, tok = models.load_sequence_classifier(str(tiny_model_dir), num_labels=1, device="cpu")
    assert model.config.pad_token_id == tok.pad_token_id == 0
    scorer = RewardModelScorer(model, tok, batch_size=16)  # one padded batch
    prompts, chosen, _ = pairs
    s = scorer.score(prompts, chosen)
    assert isinstance(s, Scores)
    assert s.mean.shape == (16,) and s.members.shape == (1, 16) and s.uncertainty.shape == (16,)
    assert torch.equal(s.uncertainty, torch.zeros(16))
    # the shortest text alone == the same text inside a right-padded batch (head reads the last non-pad)
    lengths = [len(tok(p + c)["input_ids"]) for p, c in zip(prompts, chosen)]
    i = int(np.argmin(lengths))
    assert min(lengths) < max(lengths)
    alone = scorer.score([prompts[i]], [chosen[i]])
    torch.testing.assert_close(alone.mean[0], s.mean[i], atol=1e-5, rtol=0)

    # an `alignkit rm` run directory
    run = tmp_path / "rm-run"
    model.save_pretrained(run / "model")
    tok.save_pretrained(run / "model")
    (run / "summary.json").write_text(json.dumps({"command": "rm"}))
    torch.testing.assert_close(load_scorer(str(run), device="cpu").score(prompts, chosen).mean, s.mean)


def test_function_scorers(tmp_path, monkeypatch):
    completions = ["the film was great .", "the film was bad .", "great great great great ."]
    prompts = ["review : i saw it . "] * 3
    gold = load_scorer("gold").score(prompts, completions, [True, True, False])
    expected = arena.gold_reward(completions, [True, True, False])
    np.testing.assert_allclose(gold.mean.numpy(), expected, atol=1e-6)
    assert gold.members.shape == (1, 3) and torch.equal(gold.uncertainty, torch.zeros(3))

    (tmp_path / "my_rewards.py").write_text(
        "def two(prompts, completions):\n    return [len(c) for c in completions]\n"
        "def three(prompts, completions, finished):\n    return [float(f) for f in finished]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_scorer("my_rewards:two").score(prompts, completions).mean.tolist() == [20, 18, 25]
    assert FunctionScorer.from_spec("my_rewards:three").score(prompts, completions, [1, 0, 1]).mean.tolist() == [
        1,
        0,
        1,
    ]
    with pytest.raises(UserError, match="has no function 'nope'"):
        load_scorer("my_rewards:nope")
    with pytest.raises(UserError, match="cannot import module"):
        load_scorer("no_such_module_xyz:f")
    with pytest.raises(UserError, match="expected a run directory"):
        load_scorer("not a reward")
    with pytest.raises(UserError, match="holds no reward model"):
        load_scorer(str(tmp_path))
    sys.modules.pop("my_rewards", None)


def test_bt_and_oracle_preferences(tiny_model_dir, pairs):
    ens = _ensemble(tiny_model_dir)
    _perturb_b(ens)
    scorer = EnsembleScorer(ens, mode="mixed")
    prompts, chosen, rejected = pairs
    pref = BTPreference(scorer)
    cands = chosen[:5]
    P = pref.matrix(prompts[0], cands)
    r = scorer.score([prompts[0]] * 5, cands).mean
    assert P.shape == (5, 5)
    torch.testing.assert_close(P + P.T, torch.ones(5, 5), atol=1e-6, rtol=0)
    assert torch.all(P.diagonal() == 0.5)
    torch.testing.assert_close(P, torch.sigmoid(r[:, None] - r[None, :]), atol=1e-6, rtol=0)
    p = pref.prob(prompts[:4], chosen[:4], rejected[:4])
    rw, rl = scorer.score(prompts[:4], chosen[:4]).mean, scorer.score(prompts[:4], rejected[:4]).mean
    torch.testing.assert_close(p, torch.sigmoid(rw - rl), atol=1e-6, rtol=0)

    oracle = load_preference("oracle:0.2")
    np.testing.assert_allclose(
        oracle.prob(prompts, chosen, rejected).numpy(), arena.oracle_prob(chosen, rejected, tau=0.2), atol=1e-6
    )
    Po = OraclePreference().matrix(prompts[0], cands)
    np.testing.assert_allclose(Po[0, 1].item(), arena.oracle_prob(cands[:1], cands[1:2])[0], atol=1e-6)
    assert torch.all(Po.diagonal() == 0.5)
    assert isinstance(load_preference("gold"), BTPreference)
    with pytest.raises(UserError, match="expected 'oracle', 'pairrm'"):
        load_preference("nonsense")


def test_pairrm_missing_is_a_user_error():
    pytest.importorskip("torch")
    try:
        import llm_blender  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r"pip install 'alignkit\[pairrm\]'"):
            load_preference("pairrm")
    else:  # pragma: no cover
        pytest.skip("llm-blender is installed")


def test_ensemble_scorer_auto_times_both_modes(tiny_model_dir, pairs):
    ens = _ensemble(tiny_model_dir, n=2)
    _perturb_b(ens)
    scorer = EnsembleScorer(ens, mode="auto", batch_size=8)
    s = scorer.score(pairs[0], pairs[1])
    assert set(scorer.timings) == {"mixed", "loop"} and all(t > 0 for t in scorer.timings.values())
    assert scorer.mode in ("mixed", "loop")
    assert s.members.shape == (2, 16) and s.mean.shape == (16,)
    torch.testing.assert_close(s.uncertainty, s.members.std(0, correction=0))
    torch.testing.assert_close(s.members, ens.score(pairs[0], pairs[1], mode="loop"), atol=1e-5, rtol=0)


def test_encode_truncates_the_prompt_start_and_pads_right(tiny_model_dir):
    from alignkit.rewards import encode

    tok = models.load_tokenizer(str(tiny_model_dir))
    batch = encode(tok, ["review : i watched this film last weekend . the acting was very good .", "hi"], 8, "cpu")
    texts = [tok.decode(ids) for ids in batch["input_ids"]]
    assert texts[0] == "<bos>. the acting was very good ."  # BOS kept, the completion's end kept
    assert texts[1].startswith("<bos>hi<pad>") and batch["attention_mask"][1].sum() == 3


@pytest.mark.parametrize("spec", ["oracle:abc", "oracle:", "oracle:-1", "oracle:0", "oracle:nan", "oracle:inf"])
def test_malformed_oracle_spec_is_one_line_before_any_work(spec):
    # checked on its own, whether or not a baseline will use it (`eval --preference oracle:abc`)
    with pytest.raises(UserError, match=r"TAU in oracle:TAU must be a number > 0, e\.g\. oracle:0\.1") as err:
        check_preference_spec(spec)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="oracle:TAU"):
        load_preference(spec)
    check_preference_spec("oracle")
    check_preference_spec("oracle:0.25")


def test_scorer_specs_are_checked_without_loading_a_model(tmp_path, monkeypatch):
    (tmp_path / "spec_rewards.py").write_text("def two(prompts, completions):\n    return [0.0] * len(completions)\n")
    (tmp_path / "broken_rewards.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "config.json").write_text("{}")

    def no_model(*args, **kwargs):
        raise AssertionError("a spec check must not load a model")

    monkeypatch.setattr(models, "load_sequence_classifier", no_model)
    for spec in ("gold", "spec_rewards:two", str(rm), "mbpp:tests/fixtures/mbpp.jsonl"):
        check_scorer_spec(spec)
        check_preference_spec(spec)
    bad = {
        "spec_rewards:nope": "module 'spec_rewards' has no function 'nope'",
        "no_such_module_xyz:f": "cannot import module 'no_such_module_xyz'",
        "broken_rewards:f": r"cannot import module 'broken_rewards' \(SyntaxError",
        "spec_rewards.py:two": r"give the module's name \(spec_rewards\), not its file",
        "mbpp:": "names no data",
        str(tmp_path / "missing" / "rm"): "no such directory",
        str(tmp_path / "spec_rewards.py"): "is a file",
    }
    for spec, message in bad.items():
        with pytest.raises(UserError, match=message) as err:
            check_scorer_spec(spec)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="has no function 'nope'"):
        check_preference_spec("spec_rewards:nope")
    for name in ("spec_rewards", "broken_rewards"):
        sys.modules.pop(name, None)


def test_reward_function_nan_wrong_count_or_exception_is_one_user_error(tmp_path, monkeypatch):
    (tmp_path / "odd_rewards.py").write_text(
        "import math\n"
        "def nan(prompts, completions):\n    return [1.0, math.nan, 0.0][: len(completions)]\n"
        "def inf(prompts, completions):\n    return [math.inf] * len(completions)\n"
        "def short(prompts, completions):\n    return [1.0] * (len(completions) - 1)\n"
        "def nothing(prompts, completions):\n    return None\n"
        "def words(prompts, completions):\n    return ['good'] * len(completions)\n"
        "def boom(prompts, completions):\n    return 1 / 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts, completions = ["review : i saw it . "] * 3, ["good .", "bad .", "fine ."]
    expected = {
        "nan": r"'odd_rewards:nan' returned a score that is NaN, inf or beyond float32 for 1 of 3 completions "
        r"\(the first: completion 2\)",
        "inf": "for 3 of 3 completions",
        "short": "'odd_rewards:short' returned 2 scores for 3 completions",
        "nothing": "returned 1 scores for 3 completions",
        "words": "must return a list of numbers",
        "boom": "'odd_rewards:boom' raised ZeroDivisionError: division by zero",
    }
    for name, message in expected.items():
        scorer = load_scorer(f"odd_rewards:{name}")
        with pytest.raises(UserError, match=message) as err:
            scorer.score(prompts, completions)
        assert "\n" not in str(err.value)
    sys.modules.pop("odd_rewards", None)


def test_checked_scores_guards_every_scorer():
    from alignkit.scoring import checked_scores

    good = checked_scores(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 2, "x")
    assert good.mean.tolist() == [2.0, 3.0] and good.uncertainty.tolist() == [1.0, 1.0]
    with pytest.raises(UserError, match="reward model 'm' returned a score that is NaN"):
        checked_scores(torch.tensor([[1.0, float("nan")]]), 2, "reward model 'm'")
    with pytest.raises(UserError, match="returned 3 scores for 2 completions"):
        checked_scores(torch.zeros(1, 3), 2, "reward model 'm'")


def test_layering_rewards_and_sandbox_import_no_task_and_no_circle():

    code = (
        "import sys\n"
        "import alignkit.code_reward\n"
        "assert 'alignkit.rewards' not in sys.modules and 'torch' not in sys.modules, 'code reward pulled in rewards'\n"
        "import alignkit.rewards\n"
        "assert 'alignkit.arena' not in sys.modules, 'rewards imported the built-in task at import time'\n"
        "from alignkit.rewards import Preference, Scorer, Scores\n"
        "from alignkit import scoring\n"
        "assert Scores is scoring.Scores and Scorer is scoring.Scorer and Preference is scoring.Preference\n"
    )
    assert_python_runs(code)
