"""The vLLM backend (alignkit/vllm_backend.py) against the fake `vllm` of tests/fake_vllm/, and, on a
machine with CUDA and the real vLLM, HF vs vLLM greedy texts (skipped elsewhere).

The fake keeps vLLM's API and output conventions and samples with the HF model on CPU, so these tests
check alignkit's side: the requests it builds (ids, seeds, stop ids), how it reads the outputs (EOS cut,
finished, log-probs, order), the weight names it pushes, and the CLI's checks. They say nothing about
real vLLM's numerics or memory: that is the GPU test at the end.
"""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import FAKE_VLLM
from helpers import one_line_error, run_cli

PROMPTS = ["The movie was", "I think that", "Overall the film"]


@pytest.fixture
def engine(fake_vllm, tiny_model_dir):
    from alignkit import generation

    eng, tok = generation.load_sampler("tiny", backend="vllm", seed=0)
    yield eng, tok
    eng.close()


def _hf(name="tiny"):
    from alignkit import models

    return models.load_causal_lm(name, device="cpu")


def _varied_hf():
    """The tiny model with seeded noise on its weights: the untrained one repeats one token greedily."""
    lm, tok = _hf()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return lm, tok


def _same(a, b):
    """Every field of two lists of generation.Sample, except the log-prob (compared to 1e-4)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.prompt, x.completion, x.finished, x.n_tokens, x.index, x.token_ids, x.eos_token_id) == \
               (y.prompt, y.completion, y.finished, y.n_tokens, y.index, y.token_ids, y.eos_token_id)
        if x.logprob is not None or y.logprob is not None:
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def test_greedy_samples_equal_hf_generate_with_eos_and_logprobs(engine, fake_vllm):
    """Greedy: every Sample field equals the HF backend's, including EOS-finished ones (a token the greedy
    continuation emits is made an EOS id for both backends) and log π through the EOS."""
    from alignkit import generation

    eng, tok = engine
    lm, tok_hf = _varied_hf()
    eng.sync_weights(lm)
    plain = generation.generate(lm, tok_hf, PROMPTS, k=1, temperature=0, max_new_tokens=12, progress=False)
    ids = plain[0].token_ids
    at = next(t for t in range(2, len(ids)) if ids[t] not in ids[:t])  # a token first emitted at step t >= 2
    stop = ids[at]  # ends the first prompt's completion after `at` tokens
    lm.generation_config.eos_token_id = [tok_hf.eos_token_id, stop]
    eng.eos_ids = generation.eos_ids(lm, tok_hf)
    kw = dict(k=2, temperature=0, max_new_tokens=12, progress=False, return_logprobs=True)
    ours, theirs = generation.generate(eng, tok, PROMPTS, **kw), generation.generate(lm, tok_hf, PROMPTS, **kw)
    _same(ours, theirs)
    assert ours[0].finished and ours[0].n_tokens == at and ours[0].eos_token_id == stop
    assert [s.index for s in ours] == [0, 1] * len(PROMPTS)
    # greedy: one request per prompt with n = 1, repeated K times; EOS ids are stop ids, vLLM never detokenizes
    params = fake_vllm.CALLS["generate"][-1]["params"]
    assert [p.n for p in params] == [1, 1, 1] and all(p.stop_token_ids == eng.eos_ids for p in params)
    assert all(p.detokenize is False and p.logprobs == 0 for p in params)


def test_sampling_seeds_each_sample_and_ignores_batching(engine, fake_vllm):
    """T = 1: one request per prompt with n = K; the K samples differ, and sample (i, j) is the same
    whatever other prompts share the call (its seed depends on (seed, i) only), and changes with the seed."""
    from alignkit import generation

    eng, tok = engine
    kw = dict(k=3, temperature=1.0, max_new_tokens=10, progress=False)
    full = generation.generate(eng, tok, PROMPTS, seed=5, **kw)
    params = fake_vllm.CALLS["generate"][-1]["params"]
    assert [p.n for p in params] == [3, 3, 3] and len({p.seed for p in params}) == 3
    assert len({s.completion for s in full[:3]}) == 3  # K different samples of prompt 0
    again = generation.generate(eng, tok, PROMPTS[:1], seed=5, **kw)
    assert [s.completion for s in again] == [s.completion for s in full[:3]]
    other = generation.generate(eng, tok, PROMPTS[:1], seed=6, **kw)
    assert [s.completion for s in other] != [s.completion for s in full[:3]]
    assert [s.prompt for s in full] == [p for p in PROMPTS for _ in range(3)]


def test_cut_reads_vllm_completion_outputs(engine):
    """The EOS cut on vLLM's outputs: the stop token is kept in token_ids (removed, reported as the EOS),
    a length stop is unfinished, and a stop whose token was left out still counts as finished."""
    eng, _ = engine
    eng.eos_ids = [2, 9]
    lp = [{5: SimpleNamespace(logprob=-1.0)}, {7: SimpleNamespace(logprob=-2.0)}, {9: SimpleNamespace(logprob=-0.5)}]
    stop = SimpleNamespace(token_ids=[5, 7, 9], finish_reason="stop", stop_reason=9, logprobs=lp)
    assert eng._cut(stop) == ([5, 7], True, 9, -3.5)
    length = SimpleNamespace(token_ids=[5, 7], finish_reason="length", stop_reason=None, logprobs=None)
    assert eng._cut(length) == ([5, 7], False, None, None)
    left_out = SimpleNamespace(token_ids=[5, 7], finish_reason="stop", stop_reason=None, logprobs=None)
    assert eng._cut(left_out) == ([5, 7], True, 2, None)


def test_engine_settings_and_max_new_tokens_cap(engine, fake_vllm, capsys):
    """The LLM is built like TRL's colocated one (in-process, prefix caching, alignkit's dtype rule, the
    raw distribution); max_new_tokens is capped to the model's positions as on the HF path."""
    from alignkit import generation

    eng, tok = engine
    args = fake_vllm.CALLS["engines"][-1]
    assert args["distributed_executor_backend"] == "external_launcher" and args["enable_prefix_caching"] is True
    assert args["generation_config"] == "vllm" and args["max_model_len"] == 256
    assert args["dtype"] in ("float32", "bfloat16")
    # one process: rank 0 of 1, the variables external_launcher reads (a launcher's own are kept)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
    assert os.environ["MASTER_PORT"].isdigit()
    stats: dict = {}
    generation.generate(eng, tok, PROMPTS[:1], k=1, temperature=0, max_new_tokens=10_000, progress=False, stats=stats)
    assert stats["max_new_tokens"] < 256 and "beyond the model's 256 positions" in capsys.readouterr().err
    assert fake_vllm.CALLS["generate"][-1]["params"][0].max_tokens == stats["max_new_tokens"]
    with pytest.raises(ValueError, match="hf backend"):
        generation.generate(eng, tok, PROMPTS, capture_layer=-1, progress=False)


def test_sync_weights_pushes_base_names_and_changes_samples(engine, fake_vllm):
    """A full model: every parameter pushed under its own name, then the prefix cache reset; the engine
    then samples what the updated HF model samples."""
    from alignkit import generation

    eng, tok = engine
    lm, tok_hf = _hf()
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    kw = dict(k=1, temperature=0, max_new_tokens=12, progress=False)
    before = generation.generate(eng, tok, PROMPTS, **kw)
    pushed = eng.sync_weights(lm)
    assert pushed == len(list(lm.named_parameters())) == len(fake_vllm.CALLS["load_weights"])
    assert fake_vllm.CALLS["load_weights"] == [n for n, _ in lm.named_parameters()]
    assert fake_vllm.CALLS["reset_prefix_cache"]
    after = generation.generate(eng, tok, PROMPTS, **kw)
    assert [s.completion for s in after] != [s.completion for s in before]
    _same(after, generation.generate(lm, tok_hf, PROMPTS, **kw))


def test_sync_weights_merges_lora_and_leaves_it_unmerged(engine, fake_vllm):
    """A peft LoRA policy: merged for the push (W + BA under the base names, no lora_ tensors), unmerged
    after (the adapter trains on), and the engine then samples what the LoRA policy samples."""
    from alignkit import generation, models

    eng, tok = engine
    lm, tok_hf = _hf()
    policy = models.apply_lora(lm, models.LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B = 0 at init: make the adapter matter
    base_names = [n for n, _ in _hf()[0].named_parameters()]
    eng.sync_weights(policy)
    assert sorted(fake_vllm.CALLS["load_weights"]) == sorted(base_names)
    assert not any(getattr(m, "merged", False) for m in policy.modules())  # unmerged again
    kw = dict(k=1, temperature=0, max_new_tokens=12, progress=False)
    _same(generation.generate(eng, tok, PROMPTS, **kw), generation.generate(policy, tok_hf, PROMPTS, **kw))


def test_adapter_spec_loads_its_base_and_pushes_the_merged_weights(fake_vllm, tmp_path, tiny_model_dir):
    """A LoRA adapter directory: vLLM loads the base model, the merged weights are pushed once, and the
    engine samples what `models.load_causal_lm(adapter)` (merged) samples."""
    from alignkit import generation, models

    lm, tok = _hf()
    policy = models.apply_lora(lm, models.LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    policy.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    spec = str(tmp_path / "adapter")
    eng, tok_v = generation.load_sampler(spec, backend="vllm")
    try:
        assert fake_vllm.CALLS["engines"][-1]["model"] == str(tiny_model_dir)  # the base, from adapter_config
        assert len(fake_vllm.CALLS["load_weights"]) == len(list(_hf()[0].named_parameters()))
        merged, tok_m = models.load_causal_lm(spec, device="cpu")
        kw = dict(k=1, temperature=0, max_new_tokens=10, progress=False)
        _same(generation.generate(eng, tok_v, PROMPTS, **kw), generation.generate(merged, tok_m, PROMPTS, **kw))
        plain = generation.generate(_hf()[0], tok, PROMPTS, **kw)
        assert [s.completion for s in plain] != [s.completion for s in generation.generate(eng, tok_v, PROMPTS, **kw)]
    finally:
        eng.close()


def test_rollout_sample_with_engine_follows_the_policy_across_updates(engine, fake_vllm):
    """rollout.sample(engine=...) pushes the policy before sampling, so after an update (here: the LoRA
    policy's B matrices moved) the engine samples the updated policy, and the Batch equals the HF path's."""
    from alignkit import models
    from alignkit.online import rollout

    eng, _ = engine
    lm, tok_hf = _varied_hf()
    n_base = len(list(lm.named_parameters()))
    policy = models.apply_lora(lm, models.LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    kw = dict(k=2, max_new_tokens=8, temperature=0.0, seed=3)
    first = None
    for update in range(2):
        if update:
            with torch.no_grad():
                for name, p in policy.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.5)
        n_pushed = len(fake_vllm.CALLS["load_weights"])
        ours = rollout.sample(policy, tok_hf, PROMPTS, engine=eng, **kw)
        assert len(fake_vllm.CALLS["load_weights"]) - n_pushed == n_base
        theirs = rollout.sample(policy, tok_hf, PROMPTS, **kw)
        assert torch.equal(ours.input_ids, theirs.input_ids) and torch.equal(ours.mask, theirs.mask)
        assert ours.completions == theirs.completions and ours.prompt_len == theirs.prompt_len
        assert first is None or ours.completions != first  # the update reached the engine
        first = ours.completions


# --------------------------------------------------------------------------------- the CLI


def test_generate_without_vllm_is_one_line_before_any_model_loads(monkeypatch, capsys, tmp_path):
    from alignkit import models

    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed (even where it is)
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "s.jsonl"
    for argv in (["generate", "-m", "tiny", "-p", "builtin:prompts", "--out", str(out), "--backend", "vllm"],
                 ["eval", "tiny", "--backend", "vllm", "-o", str(tmp_path / "ev")],
                 ["pairs", "-m", "tiny", "--out", str(out), "--backend", "vllm"]):
        code, _, err = run_cli(argv, monkeypatch, capsys)
        one_line_error(code, err, "needs vLLM, which is not installed: pip install 'alignkit", "CUDA")
    assert not out.exists() and not (tmp_path / "ev").exists()
    from alignkit import vllm_backend
    from alignkit.errors import UserError

    with pytest.raises(UserError, match=r"pip install 'alignkit\[vllm\]' \(needs a CUDA GPU\)"):
        vllm_backend.check_backend("vllm")


def test_vllm_without_cuda_or_on_cpu_is_one_line(fake_vllm, monkeypatch, capsys, tmp_path):
    from alignkit import vllm_backend

    out = tmp_path / "s.jsonl"
    argv = ["generate", "-m", "tiny", "-p", "builtin:prompts", "--out", str(out), "--backend", "vllm"]
    code, _, err = run_cli([*argv, "--device", "cpu"], monkeypatch, capsys)
    one_line_error(code, err, "--device cpu", "--backend hf")
    monkeypatch.setattr(vllm_backend, "_cuda_available", lambda: False)
    code, _, err = run_cli(argv, monkeypatch, capsys)
    one_line_error(code, err, "CUDA GPU", "--backend hf")
    code, _, err = run_cli([*argv[:-1], "vlm"], monkeypatch, capsys)
    one_line_error(code, err, "--backend must be hf or vllm")
    assert not out.exists()


def test_cli_generate_and_eval_with_vllm_backend(fake_vllm, monkeypatch, capsys, tmp_path, tiny_model_dir):
    """`generate --backend vllm` writes what `--backend hf` writes (greedy); `eval --backend vllm` samples
    with the engine, closes it, and takes the reference log-probs from the HF model."""
    common = ["-m", "tiny", "-p", "builtin:prompts", "--max-samples", "3", "--k", "2", "--temperature", "0",
              "--max-new-tokens", "8"]
    rows = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / f"{backend}.jsonl"
        code, _, err = run_cli(["generate", *common, "--out", str(out), "--backend", backend], monkeypatch, capsys)
        assert code == 0, err
        rows[backend] = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows["vllm"] == rows["hf"] and len(rows["hf"]) == 6
    ev = tmp_path / "ev"
    code, _, err = run_cli(["eval", "tiny", "--baseline", "tiny", "--backend", "vllm", "--max-samples", "2", "--k",
                            "2", "--max-new-tokens", "6", "-o", str(ev)], monkeypatch, capsys)
    assert code == 0, err
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["settings"]["backend"] == "vllm"
    assert summary["policies"]["tiny"]["kl"] == pytest.approx(0.0, abs=1e-4)  # log π from vLLM = HF forward
    assert fake_vllm.CALLS["cleanup"]  # the engine was closed before the reference model loaded
    pairs = tmp_path / "pairs.jsonl"
    code, out, err = run_cli(["pairs", "-m", "tiny", "--backend", "vllm", "--max-samples", "3", "--k", "3",
                              "--max-new-tokens", "6", "--out", str(pairs)], monkeypatch, capsys)
    assert code == 0, err
    assert [p.n for p in fake_vllm.CALLS["generate"][-1]["params"]] == [3, 3, 3]  # sampled by the engine
    assert "wrote" in out and pairs.is_file()


def test_sync_refuses_sharded_weights(engine):
    """A ZeRO-3 / FSDP shard cannot be pushed as a whole tensor: one line, before anything is pushed."""
    from alignkit.errors import UserError

    eng, _ = engine
    lm, _ = _hf()
    next(lm.parameters()).ds_id = 0  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    with pytest.raises(UserError, match="sharded"):
        eng.sync_weights(lm)


# --------------------------------------------------------------------------------- real vLLM


def _real_vllm() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import vllm
    except ImportError:
        return False
    return not str(getattr(vllm, "__file__", "")).startswith(str(FAKE_VLLM))


@pytest.mark.skipif(not _real_vllm(), reason="needs a CUDA GPU and the real vLLM (pip install 'alignkit[vllm]')")
def test_real_vllm_greedy_texts_equal_hf(tmp_path, tiny_model_dir):
    """On a GPU: the same prompts sampled greedily by HF generate and by vLLM give the same texts, in fp32
    (the tiny model with noisy weights, saved as a model directory, so that greedy texts vary)."""
    from alignkit import generation, models

    lm, tok = _varied_hf()
    lm.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    spec = str(tmp_path / "model")
    prompts = [f"{p} and" for p in PROMPTS] * 4
    lm, tok = models.load_causal_lm(spec, device="cuda", dtype="float32")
    hf = generation.generate(lm, tok, prompts, k=1, temperature=0, max_new_tokens=24, progress=False)
    del lm
    torch.cuda.empty_cache()
    eng, tok = generation.load_sampler(spec, backend="vllm", dtype="float32")
    try:
        ours = generation.generate(eng, tok, prompts, k=1, temperature=0, max_new_tokens=24, progress=False)
    finally:
        eng.close()
    assert len({s.completion for s in hf}) > 1  # the texts differ between prompts: the comparison means something
    assert [s.completion for s in ours] == [s.completion for s in hf]
    assert [s.finished for s in ours] == [s.finished for s in hf]


def test_ppo_samples_its_rollouts_with_the_vllm_engine(fake_vllm, tiny_model_dir, tmp_path):
    """`ppo.backend: vllm`: one engine for the run, the LoRA policy's merged weights pushed before every
    rollout (3 iterations: 3 pushes of every base weight, 3 generate calls), and the run finishes."""
    from alignkit.trainers import ppo

    cfg = ppo.PPOConfig(model={"name": "tiny", "device": "auto", "dtype": "float32", "lora": {"enabled": True}},
                        data={"max_samples": 32},
                        ppo={"iterations": 3, "prompts_per_iteration": 4, "k": 2, "max_new_tokens": 6,
                             "minibatch_size": 8, "ppo_epochs": 1, "backend": "vllm"},
                        train={"learning_rate": 1e-2, "save_steps": 0}, output={"dir": str(tmp_path / "run")})
    summary = ppo.run(cfg)
    n_weights = len(list(_hf()[0].named_parameters()))
    assert len(fake_vllm.CALLS["engines"]) == 1 and len(fake_vllm.CALLS["generate"]) == 3
    assert len(fake_vllm.CALLS["load_weights"]) == 3 * n_weights
    assert summary["iterations"] == 3 and (tmp_path / "run" / "model" / "adapter_model.safetensors").is_file()


def test_pairs_with_vllm_load_the_judge_after_the_engine_is_closed(fake_vllm, tiny_model_dir, tmp_path, monkeypatch):
    """vLLM takes 0.9 of the GPU and will not start in less free memory: the judge loads once the engine is
    closed (and the engine is closed once, also when the pairs are written)."""
    from alignkit import pairs, rewards, vllm_backend

    engines: list = []
    from_spec = vllm_backend.VLLMEngine.from_spec
    monkeypatch.setattr(vllm_backend.VLLMEngine, "from_spec",
                        classmethod(lambda cls, *a, **k: engines.append(from_spec(*a, **k)) or engines[-1]))
    open_at_load: list[bool] = []
    load_preference = rewards.load_preference
    monkeypatch.setattr(rewards, "load_preference",
                        lambda *a, **k: open_at_load.append(engines[0][0].llm is not None) or load_preference(*a, **k))
    stats = pairs.write_pairs("tiny", PROMPTS * 2, tmp_path / "pairs.jsonl", preference="oracle", backend="vllm",
                              chat="off", k=3, progress=False, max_new_tokens=8)
    assert open_at_load == [False] and engines[0][0].llm is None and stats["backend"] == "vllm"
    assert len(fake_vllm.CALLS["cleanup"]) <= 1  # a second close() is a no-op
