"""Q-probe (alignkit/trainers/qprobe/, losses in alignkit/losses.py): the losses by hand, chunking and
the global baseline, β handling, the analytic policy reward against brute force, both feature paths
agreeing with a teacher-forced forward, the probe learning on the built-in task, the error contract and
a CLI round trip collect -> fit -> eval (+ sample), the vLLM backend (through the fake `vllm` of
tests/fake_vllm/) and chat templates (`--chat`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import assert_python_runs, copy_without_chat_template, one_line_error
from helpers import run_cli as _run
from safetensors.torch import save_file

from alignkit import losses
from alignkit.errors import UserError
from alignkit.trainers import qprobe as Q


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Generation with a tiny model is ~20x faster on one thread than on two contended ones."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _features_dir(path: Path, x: torch.Tensor, rewards: list, per_prompt: int, **meta) -> Path:
    """A synthetic `qprobe collect` directory (no model): x (N, d), N = prompts x per_prompt."""
    path.mkdir(parents=True)
    save_file({"features": x.float().contiguous()}, str(path / Q.FEATURES_FILE))
    rows = [{"prompt_id": i // per_prompt, "prompt": f"p{i // per_prompt}", "sample": i % per_prompt,
             "completion": f"c{i}", "finished": True, "n_tokens": 1, "reward": r} for i, r in enumerate(rewards)]
    (path / Q.INDEX_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = {"format": Q.FORMAT, "kind": "samples", "mode": "hidden", "model": "synthetic", "layer": 1,
            "encoder": None, "d": x.shape[1], "n_per_prompt": per_prompt, "reward": "gold", "max_new_tokens": 8}
    (path / Q.META_FILE).write_text(json.dumps({**info, **meta}))
    return path


# --------------------------------------------------------------------------- losses by hand


def test_q_and_ce_losses_by_hand() -> None:
    q, r = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])
    assert losses.qprobe_q_loss(q, r).item() == pytest.approx((1 + 4) / 2)  # eq. 2
    q = torch.tensor([0.0, math.log(3.0)])  # sigma = 1/2 and 3/4
    # eq. 3: -[r log s + (1-r) log(1-s)] = -log(1/2) and -log(1/4)
    assert losses.qprobe_ce_loss(q, torch.tensor([1.0, 0.0])).item() == pytest.approx((math.log(2) + math.log(4)) / 2)
    with pytest.raises(ValueError, match="binary"):
        losses.qprobe_ce_loss(q, torch.tensor([0.5, 1.0]))


def test_pg_chunks_global_baseline_and_loss_by_hand() -> None:
    prompt = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])  # 2 prompts x 4 samples
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 0])
    chunks = losses.chunk_by_prompt(prompt, 2)  # k = 2 -> 4 chunks, never across prompts
    assert chunks.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    b = losses.global_baseline(r, prompt)  # mean of the prompt means 1/4 and 3/4
    assert b == pytest.approx(0.5)
    # ragged: a prompt with 2 samples (mean 1) and one with 4 (mean 0): b = 1/2, not the sample mean 1/3
    assert losses.global_baseline(torch.tensor([1.0, 1, 0, 0, 0, 0]), torch.tensor([3, 3, 7, 7, 7, 7])) == 0.5

    ln3 = math.log(3.0)
    q = torch.tensor([0.0, ln3, 0, 0, ln3, 0, 0, 0], requires_grad=True)
    qc, rc = q[chunks], r[chunks]
    # softmax per chunk: (1/4, 3/4), (1/2, 1/2), (3/4, 1/4), (1/2, 1/2); r - b: (1/2, -1/2), (-1/2, -1/2),
    # (1/2, 1/2), (1/2, -1/2) -> sums -1/4, -1/2, 1/2, 0 -> loss = -mean = 1/16 (eq. 5)
    loss = losses.qprobe_pg_loss(qc, rc, b, beta=1.0)
    assert loss.item() == pytest.approx(1 / 16)
    loss.backward()
    assert q.grad[0] < 0 < q.grad[1]  # raising Q of the rewarded sample of chunk 1 lowers the loss
    # β = 2: softmax(Q/2) of chunk 1 is (1, √3)/(1 + √3); chunks 2 and 4 are unchanged, chunk 3 mirrors 1
    w = math.sqrt(3) / (1 + math.sqrt(3))
    expected = -((0.5 * (1 - w) - 0.5 * w) - 0.5 + 0.5 + 0) / 4
    assert losses.qprobe_pg_loss(qc.detach(), rc, b, beta=2.0).item() == pytest.approx(expected)
    assert losses.qprobe_pg_loss(qc.detach(), rc, 0.0).item() != pytest.approx(1 / 16)  # the baseline matters
    with pytest.raises(ValueError, match="beta > 0"):
        losses.qprobe_pg_loss(qc, rc, b, beta=0.0)


def test_chunks_leave_leftovers_out_and_shuffle_within_prompts() -> None:
    prompt = torch.tensor([5, 9, 5, 9, 5, 9, 5, 9, 5])  # 5 samples of prompt 5, 4 of prompt 9
    assert losses.chunk_by_prompt(prompt, 2).tolist() == [[0, 2], [4, 6], [1, 3], [5, 7]]  # sample 8 sits out
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        c = losses.chunk_by_prompt(prompt, 2, g)
        assert c.shape == (4, 2) and len(set(c.flatten().tolist())) == 8
        assert all(len(set(prompt[row].tolist())) == 1 for row in c)  # each chunk: one prompt
    assert losses.chunk_by_prompt(prompt, 6).shape == (0, 6)


def test_pref_loss_by_hand() -> None:
    got = losses.qprobe_pref_loss(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0]))  # eqs. 6-7
    assert got.item() == pytest.approx((math.log(2) + math.log(1 + math.exp(-1))) / 2)


def test_beta_handling() -> None:
    q = torch.tensor([[1.0, 3.0, 3.0], [0.0, 0.0, 1.0]])
    assert losses.policy_weights(q, 0).tolist() == [[0.0, 0.5, 0.5], [0.0, 0.0, 1.0]]  # argmax, ties split
    torch.testing.assert_close(losses.policy_weights(q, 1e-3), losses.policy_weights(q, 0))  # β -> 0 limit
    torch.testing.assert_close(losses.policy_weights(q, 1.0), torch.softmax(q, -1))
    assert losses.policy_weights(q, 1e6).sub(1 / 3).abs().max() < 1e-5  # β -> ∞: base sampling
    with pytest.raises(ValueError, match="beta must be >= 0"):
        losses.policy_weights(q, -0.1)


# --------------------------------------------------------------------------- evaluation maths


def test_policy_table_equals_brute_force_and_is_bounded() -> None:
    q = torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0, 3.0, -1.0, 0.0])  # 2 prompts x 4 samples
    r = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 1.0, 0.0])
    prompt = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    res = Q.policy_table({"p": q}, r, prompt, ks=[1, 2, 4], betas=[0.0, 0.5])

    def brute(k: int, beta: float) -> float:  # plain Python: chunks of k in order, choice probabilities
        values = []
        for p in range(2):
            qs, rs = q[4 * p : 4 * p + 4].tolist(), r[4 * p : 4 * p + 4].tolist()
            for c in range(0, 4, k):
                qq, rr = qs[c : c + k], rs[c : c + k]
                if beta == 0:
                    top = [i for i, v in enumerate(qq) if v == max(qq)]
                    values.append(sum(rr[i] for i in top) / len(top))
                else:
                    e = [math.exp(v / beta) for v in qq]
                    values.append(sum(ei * ri for ei, ri in zip(e, rr)) / sum(e))
        return sum(values) / len(values)

    for k in (1, 2, 4):
        best, worst = res["best_of_k"][str(k)]["mean"], res["worst_of_k"][str(k)]["mean"]
        for beta in (0.0, 0.5):
            got = res["probes"]["p"][f"{beta:g}"][str(k)]["mean"]
            assert got == pytest.approx(brute(k, beta))
            assert worst - 1e-9 <= got <= best + 1e-9
    assert res["base"]["mean"] == pytest.approx(3.5 / 8)
    assert res["probes"]["p"]["0"]["1"]["mean"] == pytest.approx(res["base"]["mean"])  # k = 1 is base sampling
    assert res["best_of_k"]["4"]["mean"] == 1.0 and res["worst_of_k"]["4"]["mean"] == 0.0

    # the analytic value is what the policy's seeded draws average to (Monte Carlo, 4 chunks x 20k draws)
    chunks = losses.chunk_by_prompt(prompt, 4)
    w = losses.policy_weights(q[chunks], 0.5)
    draws = torch.multinomial(w, 20000, replacement=True, generator=torch.Generator().manual_seed(0))
    mc = r[chunks].gather(1, draws).mean().item()
    assert mc == pytest.approx(res["probes"]["p"]["0.5"]["4"]["mean"], abs=0.01)

    g = torch.Generator().manual_seed(1)  # random instances: best-of-k >= probe >= worst-of-k, any β
    for _ in range(5):
        qq, rr = torch.randn(60, generator=g), torch.rand(60, generator=g)
        out = Q.policy_table({"p": qq}, rr, torch.arange(60) // 12, ks=[3, 12], betas=[0, 0.1, 10])
        for k in ("3", "12"):
            for beta in ("0", "0.1", "10"):
                v = out["probes"]["p"][beta][k]["mean"]
                assert out["worst_of_k"][k]["mean"] - 1e-9 <= v <= out["best_of_k"][k]["mean"] + 1e-9


# --------------------------------------------------------------------------- feature paths


def test_collected_features_equal_a_teacher_forced_forward(sft_tiny_dir, tmp_path) -> None:
    from alignkit.models import load_causal_lm

    model, tok = load_causal_lm(str(sft_tiny_dir), dtype="float32", device="cpu")
    cfg = Q.CollectConfig(model=str(sft_tiny_dir), max_samples=6, n=4, layer=1, max_new_tokens=10, device="cpu",
                          output={"dir": str(tmp_path / "feat")})
    summary = Q.collect(cfg, progress=False)
    feats = Q.load_features(summary["output_dir"])
    assert feats.x.shape == (24, model.config.hidden_size) and feats.meta["layer"] == 1
    assert {r["finished"] for r in feats.rows} == {True, False}  # both kinds of last token are covered
    prompts = [r["prompt"] for r in feats.rows]
    completions = [r["completion"] for r in feats.rows]
    ids = [tok(c, add_special_tokens=False)["input_ids"] for c in completions]
    same = [i for i, row in enumerate(feats.rows) if len(ids[i]) == row["n_tokens"]]  # text re-tokenises alike
    assert len(same) >= 12
    forward = Q.hidden_features(model, tok, prompts, completions, layer=1, batch_size=5)  # the pref feature path
    torch.testing.assert_close(forward[same], feats.x[same], atol=1e-4, rtol=1e-4)
    # with the sampled ids themselves the two paths agree on every sample, default layer included
    samples, x, _ = Q.sample_features(model, tok, prompts[::4], 3, layer=Q.default_layer(2), encoder=None,
                                       progress=False, max_new_tokens=10, temperature=1.0, top_p=1.0,
                                       batch_size=8, seed=1)
    again = Q.hidden_features(model, tok, [s.prompt for s in samples], layer=2,
                              completion_ids=[s.token_ids for s in samples])
    torch.testing.assert_close(again, x, atol=1e-4, rtol=1e-4)


def test_api_mode_embeds_prompt_newline_completion(tiny_model_dir, tmp_path) -> None:
    from alignkit.models import load_encoder

    cfg = Q.CollectConfig(model=str(tiny_model_dir), embed="minilm", max_samples=3, n=2, max_new_tokens=6,
                          device="cpu", output={"dir": str(tmp_path / "api")})
    feats = Q.load_features(Q.collect(cfg, progress=False)["output_dir"])
    enc = load_encoder("minilm", device="cpu")
    texts = [f"{r['prompt']}\n{r['completion']}" for r in feats.rows]
    torch.testing.assert_close(feats.x, enc.embed(texts), atol=1e-5, rtol=1e-4)
    assert feats.meta["mode"] == "api" and feats.meta["layer"] is None and feats.d == 384


# --------------------------------------------------------------------------- fitting learns


@pytest.fixture(scope="module")
def builtin_features(sft_tiny_dir, tmp_path_factory) -> dict[str, Path]:
    """SFT tiny model on the built-in task: 64 training prompts and 32 held-out prompts, 16 samples each."""
    root = tmp_path_factory.mktemp("qprobe-builtin")
    out = {}
    for name, prompts, seed in (("train", 64, 0), ("test", 32, 1)):
        cfg = Q.CollectConfig(model=str(sft_tiny_dir), max_samples=prompts, n=16, seed=seed, device="cpu",
                              batch_size=256, output={"dir": str(root / name)})
        out[name] = Path(Q.collect(cfg, progress=False)["output_dir"])
    return out


def test_fit_learns_on_the_builtin_task(builtin_features, tmp_path) -> None:
    runs = {}
    for loss in ("q", "pg"):
        s = Q.fit(Q.FitConfig(features=str(builtin_features["train"]), loss=loss,
                              output={"dir": str(tmp_path / loss)}), progress=False)
        assert s["last_train_loss"] < s["first_train_loss"] and s["fit_seconds"] < 20
        runs[loss] = s["output_dir"]
        metrics = [json.loads(x) for x in Path(s["output_dir"], "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 150 and {"train_loss", "val_loss", "val_reward_argmax@10"} <= set(metrics[0])
        assert Path(s["output_dir"], "plots", "loss.png").is_file()
    ev = Q.evaluate_probes(Q.ProbeEvalConfig(probes=runs, features=str(builtin_features["test"]), ks=[1, 8],
                                             betas=[0, 0.1], output={"dir": str(tmp_path / "eval")}), progress=False)
    base = ev["base"]["mean"]
    for loss in ("q", "pg"):
        at8 = ev["probes"][loss]["0"]["8"]["mean"]
        assert at8 > base + 0.05, (loss, at8, base)  # held-out prompts: the probe policy beats base sampling
        assert at8 < ev["best_of_k"]["8"]["mean"]
    assert Path(ev["output_dir"], "plots", "reward_vs_k.png").is_file()


def test_pref_probe_from_pairs(tiny_model_dir, tmp_path) -> None:
    from alignkit.models import load_causal_lm

    cfg = Q.CollectConfig(model=str(tiny_model_dir), pairs="builtin:pairwise", max_samples=40, device="cpu",
                          output={"dir": str(tmp_path / "pairs")})
    feats = Q.load_features(Q.collect(cfg)["output_dir"])
    assert feats.kind == "pairs" and feats.chosen.shape == feats.rejected.shape == (40, 128)
    model, tok = load_causal_lm(str(tiny_model_dir), device="cpu")
    row = feats.rows[3]
    one = Q.hidden_features(model, tok, [row["prompt"]], [row["chosen"]], layer=feats.meta["layer"])
    torch.testing.assert_close(one[0], feats.chosen[3], atol=1e-4, rtol=1e-4)
    s = Q.fit(Q.FitConfig(features=str(feats.path), loss="pref", lr=1e-2, epochs=30,
                          output={"dir": str(tmp_path / "fit")}), progress=False)
    assert s["last_train_loss"] < s["first_train_loss"] and s["unit"] == "pair" and "accuracy" in s["train"]
    with pytest.raises(UserError, match="needs sampled completions"):
        Q.fit(Q.FitConfig(features=str(feats.path), loss="pg", output={"dir": str(tmp_path / "x")}))


# --------------------------------------------------------------------------- the error contract


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    """Valid and damaged features directories and probe runs, built once (tests only read them)."""
    tmp_path = tmp_path_factory.mktemp("qprobe-bad")
    g = torch.Generator().manual_seed(0)
    d = {
        "real": _features_dir(tmp_path / "real", torch.randn(12, 4, generator=g), [0.3, -1.0, 2.0] * 4, 3),
        "binary": _features_dir(tmp_path / "binary", torch.randn(12, 4, generator=g), [0.0, 1.0, 1.0] * 4, 3),
        "wide": _features_dir(tmp_path / "wide", torch.randn(12, 6, generator=g), [0.0, 1.0, 1.0] * 4, 3, d=6),
        "noreward": _features_dir(tmp_path / "noreward", torch.randn(6, 4, generator=g), [0.1, None] * 3, 3),
    }
    d["probe"] = Q.fit(Q.FitConfig(features=str(d["binary"]), loss="q", k=3, epochs=2,
                                   output={"dir": str(tmp_path / "probe")}), progress=False)["output_dir"]
    d.update(_corrupt_features(tmp_path, d["real"]))
    d.update(_corrupt_probes(tmp_path, Path(d["probe"])))
    d["plain"] = copy_without_chat_template(tiny_model_dir, tmp_path / "plain-tokenizer")
    d["chat_pairs"] = _chat_pairs(tmp_path / "chat-pairs.jsonl")
    return {k: str(v) for k, v in d.items()} | {"tiny": str(tiny_model_dir)}


CHAT_PAIRS = [  # conversational pairs: message prompts, one assistant reply per side
    ([{"role": "user", "content": "review : the food was"}], "great and fresh .", "cold ."),
    ([{"role": "system", "content": "be kind ."}, {"role": "user", "content": "review : our stay"}], "lovely .",
     "bad ."),
    ([{"role": "user", "content": "review : the staff"}], "were helpful .", "ignored us ."),
]


def _chat_pairs(path: Path, extra_turn: bool = False) -> Path:
    rows = [{"prompt": p, "chosen": [{"role": "assistant", "content": c}] + (
             [{"role": "user", "content": "more ."}, {"role": "assistant", "content": c}] if extra_turn else []),
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in CHAT_PAIRS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _corrupt_features(tmp_path: Path, good: Path) -> dict[str, Path]:
    """Damaged copies of a valid features directory, one fault each (Part B: a traceback before, one line now)."""
    import shutil

    def copy(name: str) -> Path:
        return Path(shutil.copytree(good, tmp_path / name))

    out = {name: copy(name) for name in ("truncated", "garbage", "meta_d", "row_list", "not_utf8", "flat", "nan",
                                         "pairs_no_sides")}
    blob = (good / Q.FEATURES_FILE).read_bytes()
    (out["truncated"] / Q.FEATURES_FILE).write_bytes(blob[: len(blob) // 2])  # a kill while writing
    (out["garbage"] / Q.FEATURES_FILE).write_bytes(b"this is not a safetensors file, just text")
    meta = json.loads((good / Q.META_FILE).read_text())
    (out["meta_d"] / Q.META_FILE).write_text(json.dumps({**meta, "d": "four"}))
    (out["pairs_no_sides"] / Q.META_FILE).write_text(json.dumps({**meta, "kind": "pairs"}))
    lines = (good / Q.INDEX_FILE).read_text().splitlines()
    (out["row_list"] / Q.INDEX_FILE).write_text("[1, 2]\n" + "\n".join(lines[1:]) + "\n")
    (out["not_utf8"] / Q.INDEX_FILE).write_bytes(b"\xff\xfe" + (good / Q.INDEX_FILE).read_bytes())
    save_file({"features": torch.randn(12)}, str(out["flat"] / Q.FEATURES_FILE))  # 1-D: the shape does not match
    x = torch.randn(12, 4)
    x[3, 1] = float("nan")
    save_file({"features": x}, str(out["nan"] / Q.FEATURES_FILE))
    return out


def _corrupt_probes(tmp_path: Path, good: Path) -> dict[str, Path]:
    import shutil

    out = {name: Path(shutil.copytree(good, tmp_path / name)) for name in ("probe_cut", "probe_json", "probe_shape")}
    blob = (good / Q.PROBE_FILE).read_bytes()
    (out["probe_cut"] / Q.PROBE_FILE).write_bytes(blob[:40])
    (out["probe_json"] / Q.PROBE_INFO).write_text('{"d": 4, "loss": ')
    save_file({"net.weight": torch.zeros(1, 6), "net.bias": torch.zeros(1), "mean": torch.zeros(6),
               "std": torch.ones(6)}, str(out["probe_shape"] / Q.PROBE_FILE))
    return out


BAD = [
    (["fit", "{wide}", "--loss", "pg"], None),  # sanity: a valid call (exit 0), see below
    (["eval", "{probe}", "--features", "{wide}"], ["dimension", "d = 4", "d = 6"]),
    (["fit", "{real}", "--k", "0"], ["k:", "greater than or equal to 1"]),
    (["eval", "{probe}", "--features", "{binary}", "--k", "0,2"], ["every k must be >= 1"]),
    (["eval", "{probe}", "--features", "{binary}", "--beta", "0,-1"], ["every β must be >= 0"]),
    (["fit", "{real}", "--beta", "-1"], ["beta"]),
    (["sample", "{probe}", "--out", "{out}.jsonl", "--beta", "-0.5"], ["--beta must be >= 0"]),
    (["sample", "{probe}", "--out", "{out}.jsonl", "--k", "0"], ["--k must be at least 1"]),
    (["fit", "{noreward}"], ["row 2", "no reward"]),
    (["eval", "{probe}", "--features", "{noreward}"], ["row 2", "no reward"]),
    (["fit", "{real}", "--loss", "ce"], ["ce loss", "binary", "--binary-threshold"]),
    (["fit", "{real}", "--k", "4"], ["--k 4", "samples per prompt", "(3)"]),
    (["eval", "{probe}", "--features", "{binary}", "--k", "1,4"], ["--k 4", "samples per prompt"]),
    (["fit", "{real}", "--loss", "dpo"], ["loss", "'q', 'ce', 'pg' or 'pref'"]),
    (["fit", "{real}", "--loss", "pref"], ["pref loss", "needs pairs"]),
    (["fit", "{out}/nowhere"], ["not a Q-probe features directory"]),
    (["eval", "{real}", "--features", "{binary}"], ["not a finished `alignkit qprobe fit` run"]),
    (["collect", "--model", "{tiny}", "--layer", "3", "--n", "2"], ["--layer 3", "2 layers"]),
    (["collect", "--model", "{tiny}", "--reward", "no_such_module:fn"], ["no_such_module"]),
    (["collect", "--model", "{tiny}", "--embed", "minilm", "--layer", "1"], ["layer", "--embed"]),
    (["collect", "--model", "{tiny}", "--pairs", "builtin:sft"], ["pairwise", "sft"]),
    # Part B (issue 9): corrupt feature / probe files, inf / nan and negative seeds
    (["fit", "{truncated}"], ["features.safetensors", "not a readable safetensors file", "collect again"]),
    (["fit", "{garbage}"], ["features.safetensors", "not a readable safetensors file"]),
    (["fit", "{meta_d}"], ["meta.json", "'d' must be a positive integer", "'four'"]),
    (["fit", "{row_list}"], ["index.jsonl line 1", "integer 'prompt_id'"]),
    (["fit", "{not_utf8}"], ["index.jsonl", "not UTF-8"]),
    (["fit", "{flat}"], ["'features' is", "[12]", "expected float [12, 4]"]),
    (["fit", "{nan}"], ["'features' holds NaN or infinite values"]),
    (["fit", "{pairs_no_sides}", "--loss", "pref"], ["no 'chosen' tensor", "chosen and rejected"]),
    (["eval", "{probe_cut}", "--features", "{binary}"], ["probe.safetensors", "not a readable safetensors file"]),
    (["eval", "{probe_json}", "--features", "{binary}"], ["probe.json", "not a valid probe description"]),
    (["eval", "{probe_shape}", "--features", "{binary}"], ["probe.safetensors does not match probe.json"]),
    (["sample", "{probe_json}", "--out", "{out}.jsonl"], ["probe.json", "not a valid probe description"]),
    (["fit", "{real}", "--lr", "inf"], ["lr", "finite number"]),
    (["fit", "{real}", "--lr", "1e38"], ["lr", "too large", "float32"]),
    (["eval", "{probe}", "--features", "{binary}", "--beta", "0,nan"], ["betas", "finite number"]),
    (["sample", "{probe}", "--out", "{out}.jsonl", "--beta", "nan"], ["--beta must be >= 0", "finite"]),
    (["fit", "{real}", "--seed", "-1"], ["seed", "0"]),  # config (ge=0) or the CLI's own seed check
    (["collect", "--model", "{tiny}", "--seed", "-1"], ["seed", "0"]),
    (["sample", "{probe}", "--out", "{out}.jsonl", "--seed", "-1"], ["--seed must be >= 0"]),
    # issue 12: --chat and --backend
    (["collect", "--model", "{plain}", "--chat", "on"], ["--chat on needs a tokenizer with a chat template"]),
    (["collect", "--model", "{tiny}", "--chat", "maybe"], ["chat", "'auto', 'on' or 'off'"]),
    (["collect", "--model", "{plain}", "--pairs", "{chat_pairs}"], ["chat-pairs.jsonl row 1", "no chat template"]),
    (["collect", "--model", "{tiny}", "--pairs", "{chat_pairs}", "--backend", "vllm"], ["--pairs", "samples nothing"]),
    (["collect", "--model", "{tiny}", "--backend", "tgi"], ["backend", "'hf' or 'vllm'"]),
    (["sample", "{probe}", "--out", "{out}.jsonl", "--model", "{plain}", "--chat", "on"], ["--chat on needs"]),
    (["sample", "{probe}", "--out", "{out}.jsonl", "--chat", "maybe"], ["--chat must be auto, on or off"]),
]


@pytest.mark.parametrize("argv, words", BAD[1:], ids=[" ".join(a[:2] + a[3:]) for a, _ in BAD[1:]])
def test_bad_input_one_line_exit_2_nothing_written(argv, words, bad, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "result"
    argv = ["qprobe", *[a.format(**bad, out=out) for a in argv], "-o", str(out)] if argv[0] != "sample" else \
        ["qprobe", *[a.format(**bad, out=out) for a in argv]]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = _run(argv, monkeypatch, capsys)
    assert code == 2, (code, stdout, err)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing may be written"


def test_a_diverging_fit_stops_and_leaves_no_finished_run(bad, tmp_path, monkeypatch, capsys) -> None:
    """Part B (issue 9): a finite but huge --lr drives the q loss to inf; the fit used to finish with it."""
    out = tmp_path / "diverged"
    code, _, err = _run(["qprobe", "fit", bad["real"], "--loss", "q", "--k", "3", "--lr", "1e20", "-o", str(out)],
                        monkeypatch, capsys)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "qprobe fit diverged at epoch" in lines[0] and "lower the learning rate" in lines[0]
    assert not out.exists()  # nothing that looks finished: no DIR, no summary, no probe
    partial = tmp_path / "diverged.partial"
    assert not (partial / "summary.json").exists() and not (partial / Q.PROBE_FILE).exists()


def test_configs_import_without_torch() -> None:
    """The CLI builds Q-probe configs for --help / validation: alignkit.trainers.qprobe must not import torch
    (the package `alignkit.trainers` itself is stubbed here: its own imports are not this module's concern)."""

    code = (
        "import sys, types, pathlib, alignkit\n"
        "pkg = types.ModuleType('alignkit.trainers')\n"
        "pkg.__path__ = [str(pathlib.Path(alignkit.__file__).parent / 'trainers')]\n"
        "sys.modules['alignkit.trainers'] = pkg\n"
        "from alignkit.trainers import qprobe\n"
        "qprobe.FitConfig(features='x'); qprobe.CollectConfig()\n"
        "qprobe.ProbeEvalConfig(probes={'a': 'b'}, features='x')\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert set(qprobe.__all__) >= {'fit', 'collect', 'sample', 'evaluate_probes', 'load_probe'}\n"
    )
    assert_python_runs(code)


def test_valid_synthetic_fit_and_python_api_errors(bad, tmp_path, monkeypatch, capsys) -> None:
    argv = ["qprobe", *[a.format(**bad) for a in BAD[0][0]], "--k", "3", "--epochs", "3", "-o", str(tmp_path / "ok")]
    code, _, err = _run(argv, monkeypatch, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "ok" / "probe.json").read_text())["d"] == 6
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())  # the fit runs on trainers.loop.Loop
    assert summary["loop"]["unit"] == "epoch" and summary["loop"]["steps"] == 3
    assert set(summary["time_split_s"]) == {"train", "validate"}
    rows = [json.loads(x) for x in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all("time_train_s" in r for r in rows)
    with pytest.raises(UserError, match="binary"):
        Q.fit(Q.FitConfig(features=bad["real"], loss="ce", output={"dir": str(tmp_path / "ce")}))
    # with a threshold the same rewards become 1[r > 0] and ce trains
    s = Q.fit(Q.FitConfig(features=bad["real"], loss="ce", binary_threshold=0.0, k=3, epochs=2,
                          output={"dir": str(tmp_path / "ce2")}), progress=False)
    assert s["loss"] == "ce"
    probe, info = Q.load_probe(bad["probe"])
    with pytest.raises(UserError, match="dimension 6"):
        probe(torch.zeros(2, 6))
    assert not (tmp_path / "ce").exists()


# --------------------------------------------------------------------------- the CLI round trip


def test_cli_round_trip_collect_fit_eval_sample(tiny_model_dir, tmp_path, monkeypatch, capsys) -> None:
    m, o = str(tiny_model_dir), tmp_path
    common = ["--model", m, "--n", "4", "--max-new-tokens", "8", "--device", "cpu"]
    for name, seed in (("train", "0"), ("test", "1")):
        code, _, err = _run(["qprobe", "collect", *common, "--max-samples", "8", "--seed", seed, "-o",
                             str(o / name)], monkeypatch, capsys)
        assert code == 0, err
    meta = json.loads((o / "train" / "meta.json").read_text())
    assert meta["layer"] == 2 and meta["n_per_prompt"] == 4 and meta["d"] == 128 and "generate_s" in meta["timings"]
    rows = [json.loads(x) for x in (o / "train" / "index.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and {"prompt_id", "prompt", "sample", "completion", "finished", "reward"} <= set(rows[0])
    for loss in ("q", "pg"):
        code, _, err = _run(["qprobe", "fit", str(o / "train"), "--loss", loss, "--k", "2", "--epochs", "5",
                             "-o", str(o / loss)], monkeypatch, capsys)
        assert code == 0, err
    code, out, err = _run(["qprobe", "eval", f"q={o / 'q'}", f"pg={o / 'pg'}", "--features", str(o / "test"),
                           "--k", "1,2,4", "--beta", "0,1", "--model", m, "--device", "cpu", "-o", str(o / "ev")],
                          monkeypatch, capsys)
    assert code == 0, err
    assert "best-of-k" in out and "greedy" in out and "pg β=0" in out
    s = json.loads((o / "ev" / "summary.json").read_text())
    assert set(s["probes"]) == {"q", "pg"} and set(s["probes"]["pg"]) == {"0", "1"}
    assert s["greedy"]["mean"] is not None and (o / "ev" / "greedy.jsonl").is_file()
    assert (o / "ev" / "plots" / "reward_vs_k.png").is_file()
    assert s["best_of_k"]["4"]["mean"] >= s["probes"]["pg"]["0"]["4"]["mean"] >= s["worst_of_k"]["4"]["mean"]
    code, out, err = _run(["qprobe", "eval", str(o / "q"), "--features", str(o / "test"), "-o", str(o / "ev2")],
                          monkeypatch, capsys)
    assert code == 0 and "greedy omitted" in out.replace("\n", " ")
    assert json.loads((o / "ev2" / "summary.json").read_text())["settings"]["ks"] == [1, 2, 4]


def test_sample_picks_the_argmax_and_is_seeded(tiny_model_dir, tmp_path) -> None:
    from alignkit.models import load_causal_lm

    feats = _features_dir(tmp_path / "f", torch.randn(8, 128), [0.0, 1.0] * 4, 4, model=str(tiny_model_dir), layer=2)
    run = Q.fit(Q.FitConfig(features=str(feats), loss="q", k=2, epochs=1, zero_init=False,
                            output={"dir": str(tmp_path / "probe")}), progress=False)["output_dir"]
    kw = dict(k=4, max_samples=3, max_new_tokens=6, device="cpu", progress=False)
    res = Q.sample(run, "builtin:prompts", tmp_path / "argmax.jsonl", beta=0.0, reward="gold", **kw)
    rows = [json.loads(x) for x in (tmp_path / "argmax.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and "reward_mean" in res and all(r["prob"] > 0 for r in rows)
    model, tok = load_causal_lm(str(tiny_model_dir), device="cpu")
    probe, _ = Q.load_probe(run)
    samples, x, _ = Q.sample_features(model, tok, [r["prompt"] for r in rows], 4, layer=2, encoder=None,
                                       progress=False, max_new_tokens=6, temperature=1.0, top_p=1.0,
                                       batch_size=64, seed=0)
    with torch.no_grad():
        q = probe(x).reshape(3, 4)
    assert [r["index"] for r in rows] == q.argmax(-1).tolist()
    for i, r in enumerate(rows):
        assert r["completion"] == samples[4 * i + r["index"]].completion and r["q"] == pytest.approx(q[i].max().item())
    a = Q.sample(run, "builtin:prompts", tmp_path / "a.jsonl", beta=1.0, seed=3, **kw)
    b = Q.sample(run, "builtin:prompts", tmp_path / "b.jsonl", beta=1.0, seed=3, **kw)
    assert a["n_prompts"] == b["n_prompts"] == 3
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    with pytest.raises(UserError, match="already exists"):
        Q.sample(run, "builtin:prompts", tmp_path / "a.jsonl", beta=1.0, **kw)


# --------------------------------------------------------------------------- backends and chat templates (issue 12)

CHAT_PROMPTS = ["review : the food was", "review : our stay", "review : the staff"]


def _prompts_file(path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in CHAT_PROMPTS))
    return path


def test_vllm_backend_features_equal_hf_capture_greedy(fake_vllm, tiny_model_dir, tmp_path, monkeypatch) -> None:
    """Greedy (T = 0): vLLM samples, then ONE teacher-forced forward of the HF model gives the features that
    capture during HF sampling gives; meta.json records the backend and the time of each part. The reward
    model loads after the engine is closed (vLLM needs 0.9 of the GPU free to start)."""
    from alignkit import rewards

    at_load: list[tuple[int, int]] = []  # (engine generate calls, engine cleanups) when a scorer loads
    load_scorer = rewards.load_scorer
    monkeypatch.setattr(rewards, "load_scorer", lambda *a, **k: at_load.append(
        (len(fake_vllm.CALLS["generate"]), len(fake_vllm.CALLS["cleanup"]))) or load_scorer(*a, **k))
    common = dict(model=str(tiny_model_dir), max_samples=3, n=2, layer=1, max_new_tokens=6, temperature=0.0,
                  device="auto", dtype="float32")
    feats = {}
    for backend in ("hf", "vllm"):
        cfg = Q.CollectConfig(**common, backend=backend, output={"dir": str(tmp_path / backend)})
        feats[backend] = Q.load_features(Q.collect(cfg, progress=False)["output_dir"])
    hf, vl = feats["hf"], feats["vllm"]
    assert [r["completion"] for r in vl.rows] == [r["completion"] for r in hf.rows]
    torch.testing.assert_close(vl.x, hf.x, atol=1e-4, rtol=1e-4)
    assert (hf.meta["backend"], vl.meta["backend"]) == ("hf", "vllm")
    assert vl.meta["chat"] == hf.meta["chat"] == "off" and vl.meta["templated"] is False  # builtin: auto is off
    assert vl.meta["timings"]["forward_s"] > 0 and "forward_load_s" in vl.meta["timings"]
    assert hf.meta["timings"]["forward_s"] == 0  # captured while sampling: no second forward
    assert len(fake_vllm.CALLS["generate"]) == 1 and fake_vllm.CALLS["cleanup"]  # one engine, closed after sampling
    assert at_load[-1][0] == 1 and at_load[-1][1] >= 1  # the vLLM collect's scorer: after sampling and closing
    # `qprobe sample` too: the probe policy picks the same completions with the same Q from either backend
    run = Q.fit(Q.FitConfig(features=str(hf.path), loss="q", k=2, epochs=1, zero_init=False,
                            output={"dir": str(tmp_path / "probe")}), progress=False)["output_dir"]
    picked = {}
    for backend in ("hf", "vllm"):
        res = Q.sample(run, "builtin:prompts", tmp_path / f"{backend}.jsonl", k=2, beta=0.0, max_samples=3,
                       backend=backend, dtype="float32", progress=False)
        assert res["backend"] == backend and res["warnings"] == []
        picked[backend] = [json.loads(x) for x in (tmp_path / f"{backend}.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in picked["vllm"]] == [r["completion"] for r in picked["hf"]]
    assert [r["q"] for r in picked["vllm"]] == pytest.approx([r["q"] for r in picked["hf"]], abs=1e-4)


def test_chat_on_features_read_the_rendered_ids(tiny_model_dir, tmp_path) -> None:
    """`--chat on`: the features are those of the template's ids + the completion (capture during sampling ==
    `hidden_features(chat="on")`), not those of the plain text; meta.json records it, and `qprobe sample`
    reuses it by default and warns when told otherwise."""
    from alignkit.models import load_causal_lm

    model, tok = load_causal_lm(str(tiny_model_dir), dtype="float32", device="cpu")
    samples, x, _ = Q.sample_features(model, tok, CHAT_PROMPTS, 2, layer=1, encoder=None, progress=False,
                                       max_new_tokens=5, temperature=1.0, top_p=1.0, batch_size=8, seed=0, chat="on")
    assert samples[0].prompt == f"user: {CHAT_PROMPTS[0]}\nassistant:"
    rep, ids = [p for p in CHAT_PROMPTS for _ in range(2)], [s.token_ids for s in samples]
    on = Q.hidden_features(model, tok, rep, layer=1, completion_ids=ids, chat="on")
    torch.testing.assert_close(on, x, atol=1e-4, rtol=1e-4)
    off = Q.hidden_features(model, tok, rep, layer=1, completion_ids=ids, chat="off")
    assert (off - x).abs().max() > 1e-2
    template = tok.apply_chat_template([{"role": "user", "content": CHAT_PROMPTS[0]}], add_generation_prompt=True,
                                       tokenize=False)  # by hand: the template's text, its own special tokens
    by_hand = tok(template, add_special_tokens=False)["input_ids"] + ids[0]
    with torch.no_grad():
        state = model(input_ids=torch.tensor([by_hand]), output_hidden_states=True).hidden_states[1][0, -1]
    torch.testing.assert_close(state, x[0], atol=1e-4, rtol=1e-4)

    src = str(_prompts_file(tmp_path / "prompts.jsonl"))
    common = dict(model=str(tiny_model_dir), prompts=src, n=2, layer=1, max_new_tokens=5, reward="gold",
                  device="cpu", dtype="float32")
    runs = {c: Q.collect(Q.CollectConfig(**common, chat=c, output={"dir": str(tmp_path / c)}), progress=False)
            for c in ("auto", "off")}
    assert (runs["auto"]["chat"], runs["auto"]["templated"]) == ("on", True)  # auto: the tokenizer has a template
    assert (runs["off"]["chat"], runs["off"]["templated"]) == ("off", False)
    with_chat, plain = (Q.load_features(runs[c]["output_dir"]) for c in ("auto", "off"))
    assert with_chat.rows[0]["prompt"] == CHAT_PROMPTS[0]  # the index keeps the prompt as given
    assert (with_chat.x - plain.x).abs().max() > 1e-2

    run = Q.fit(Q.FitConfig(features=str(with_chat.path), loss="q", k=2, epochs=1,
                            output={"dir": str(tmp_path / "probe")}), progress=False)["output_dir"]
    kw = dict(k=2, beta=0.0, max_new_tokens=4, device="cpu", dtype="float32", progress=False)
    same = Q.sample(run, src, tmp_path / "same.jsonl", **kw)
    assert same["chat"] == "on" and same["warnings"] == []  # the probe's setting by default
    other = Q.sample(run, src, tmp_path / "other.jsonl", chat="off", **kw)
    assert other["chat"] == "off" and "through the chat template" in other["warnings"][0]


def test_chat_message_pairs_are_rendered_through_the_template(tiny_model_dir, tmp_path) -> None:
    """Pairs whose prompts are chat messages: the prompt side goes through the template, chosen / rejected
    are the assistant replies' text; a reply of several turns is one line."""
    from alignkit.models import load_causal_lm

    src = _chat_pairs(tmp_path / "pairs.jsonl")
    cfg = Q.CollectConfig(model=str(tiny_model_dir), pairs=str(src), layer=1, device="cpu", dtype="float32",
                          output={"dir": str(tmp_path / "feat")})
    feats = Q.load_features(Q.collect(cfg, progress=False)["output_dir"])
    assert feats.kind == "pairs" and feats.meta["templated"] is True
    assert [r["chosen"] for r in feats.rows] == [c for _, c, _ in CHAT_PAIRS]
    model, tok = load_causal_lm(str(tiny_model_dir), dtype="float32", device="cpu")
    expected = Q.hidden_features(model, tok, [p for p, _, _ in CHAT_PAIRS], [c for _, c, _ in CHAT_PAIRS], layer=1)
    torch.testing.assert_close(feats.chosen, expected, atol=1e-4, rtol=1e-4)  # messages: the template always
    with pytest.raises(UserError, match="'chosen' holds 3 messages"):
        Q.collect(Q.CollectConfig(model=str(tiny_model_dir), pairs=str(_chat_pairs(tmp_path / "x.jsonl", True)),
                                  device="cpu", output={"dir": str(tmp_path / "x")}))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("step", ["collect", "sample"])
def test_backend_vllm_without_vllm_is_one_line(step, bad, tmp_path, monkeypatch, capsys) -> None:
    """No vLLM installed: `--backend vllm` stops with the install hint before anything loads or is written."""
    from alignkit import models, vllm_backend

    monkeypatch.setattr(vllm_backend, "_vllm_installed", lambda: False)
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "out"
    argv = ["qprobe", "collect", "--model", bad["tiny"], "-o", str(out)] if step == "collect" else \
        ["qprobe", "sample", bad["probe"], "--out", str(out)]
    code, _, err = _run([*argv, "--backend", "vllm"], monkeypatch, capsys)
    one_line_error(code, err, "--backend vllm", "pip install 'alignkit[vllm]'")
    assert list(tmp_path.iterdir()) == []
