"""`alignkit bench ...`: measurements of alignkit on this machine (overhead against raw TRL, sampling,
scoring, Q-probe fit) and the paper-table reproductions on the built-in task (docs/benchmarks.md).
The work lives in the bench package; this module parses, prints the table and writes --json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from alignkit.cli.common import DeviceOpt, SeedOpt, app, check_output_file, check_seed, console
from alignkit.errors import UserError


def _writable(flag: str):
    """A typer callback: an output file given to `flag` must be writable, checked before the benchmark runs."""

    def check(value: Path | None) -> Path | None:
        if value is not None:
            check_output_file(value, overwrite=True, flag=flag)
        return value

    return check


bench_app = typer.Typer(
    help="Measure alignkit's overhead and throughput on this machine.", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")
JsonOpt = Annotated[
    Path | None, typer.Option("--json", help="also write the full result as JSON here", callback=_writable("--json"))
]
PlotOpt = Annotated[  # the paper tables' figure
    Path | None, typer.Option("--plot", help="write the reward-vs-KL figure here", callback=_writable("--plot"))
]


def _bench_out(result: dict[str, Any], rows: list[tuple[str, str]], title: str, out: Path | None) -> None:
    table = Table(title=title, show_header=False)
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    if out is not None:
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        console.print(f"wrote {out}")


@bench_app.command("sft")
def bench_sft(
    rows: Annotated[int, typer.Option("--rows", min=1, help="built-in SFT rows")] = 2000,
    steps: Annotated[int, typer.Option("--steps", min=1, help="optimiser steps per job")] = 120,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="interleaved TRL/alignkit pairs")] = 7,
    json_out: JsonOpt = None,
) -> None:
    """`alignkit sft` vs the same job written against TRL, interleaved in one process."""
    from alignkit import bench

    r = bench.sft_overhead(n_rows=rows, steps=steps, repeats=repeats)
    m, t, a, lc = r["machine"], r["trl"], r["alignkit"], r["loss_curves"]
    walls = lambda x: ", ".join(f"{w:.2f}" for w in x["wall_s"])  # noqa: E731
    _bench_out(r, [
        ("machine", f"{m['cpu']}, {m['cores']} cores; torch {m['torch']}, transformers {m['transformers']}, "
                    f"trl {m['trl']}; load avg {m['load_avg_1m']:.2f} -> {r['load_avg_1m_end']:.2f}"),
        ("job", f"tiny model, {rows} rows, {steps} steps x batch {bench.BATCH_SIZE}, "
                f"{repeats} interleaved pairs"),
        ("raw TRL wall s", f"{walls(t)} (median {t['median_wall_s']:.2f})"),
        ("alignkit wall s", f"{walls(a)} (median {a['median_wall_s']:.2f})"),
        ("ratio alignkit/TRL (wall, median)", f"{r['ratio_wall']:.3f} ({r['overhead_s']:+.2f} s)"),
        ("ratio per pair (median | of minima)", f"{r['median_pair_ratio_wall']:.3f} | {r['ratio_min_wall']:.3f}"),
        ("ratio (train loop only | process CPU time)",
         f"{r['ratio_train_runtime']:.3f} | {r['ratio_cpu']:.3f}"),
        ("outside train loop s TRL | alignkit", f"{t['median_outside_train_s']:.2f} | "
                                                f"{a['median_outside_train_s']:.2f}"),
        ("tokens/s TRL | alignkit", f"{t['tokens_per_s']:.0f} | {a['tokens_per_s']:.0f}"),
        ("samples/s TRL | alignkit", f"{t['samples_per_s']:.1f} | {a['samples_per_s']:.1f}"),
        ("loss curves identical", f"{lc['identical']} (max |diff| {lc['max_abs_diff']:.1e} at same-window "
                                  f"steps, {lc['max_abs_diff_running_mean']:.1e} in running mean over "
                                  f"{len(lc['steps_compared'])} logged steps)"),
        ("same rows | same tokenised inputs", f"{r['rows_identical']} | "
                                              f"{r.get('warmup', {}).get('tokenised_inputs_identical')}"),
    ], "alignkit bench sft", json_out)


@bench_app.command("dpo")
def bench_dpo(
    model: Annotated[str, typer.Option("--model", help="tiny, random-1b (random 16x2048 Llama), or a dir")] = "tiny",
    pairs: Annotated[int, typer.Option("--pairs", min=8, help="builtin:pairwise pairs")] = 512,
    steps: Annotated[int, typer.Option("--steps", min=1, help="optimiser steps per job")] = 32,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="interleaved TRL/alignkit pairs")] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="pairs per step")] = 16,
    max_length: Annotated[int, typer.Option("--max-length", min=16, help="tokens per sequence")] = 128,
    device: DeviceOpt = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 or bfloat16")] = "float32",
    lora: Annotated[bool, typer.Option("--lora/--no-lora", help="LoRA (both jobs)")] = False,
    json_out: JsonOpt = None,
) -> None:
    """`alignkit dpo` vs the same job written against TRL's DPOTrainer, interleaved in one process."""
    from alignkit import bench

    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype must be float32 or bfloat16, got '{dtype}'")
    r = bench.dpo_overhead(model=model, n_pairs=pairs, steps=steps, repeats=repeats, batch_size=batch_size,
                           max_length=max_length, device=device or "cpu", dtype=dtype, lora=lora)
    m, t, a, lc, st = r["machine"], r["trl"], r["alignkit"], r["loss_curves"], r["settings"]
    walls = lambda x: ", ".join(f"{w:.2f}" for w in x["wall_s"])  # noqa: E731
    mem = lambda x: "–" if x["peak_gib"] is None else f"{x['peak_gib']:.2f} GiB"  # noqa: E731
    _bench_out(r, [
        ("machine", f"{m['gpu'] or m['cpu']}, {m['cores']} cores; torch {m['torch']}, trl {m['trl']}; "
                    f"load avg {m['load_avg_1m']:.2f} -> {r['load_avg_1m_end']:.2f}"),
        ("job", f"{model} ({st['params'] / 1e6:.0f}M params, {dtype}, {'LoRA' if lora else 'full FT'}), "
                f"{steps} steps x {batch_size} pairs, max_length {max_length}, {repeats} interleaved pairs"),
        ("raw TRL wall s", f"{walls(t)} (median {t['median_wall_s']:.2f})"),
        ("alignkit wall s", f"{walls(a)} (median {a['median_wall_s']:.2f})"),
        ("ratio alignkit/TRL (wall, median | per pair)", f"{r['ratio_wall']:.3f} | {r['median_pair_ratio_wall']:.3f}"),
        ("ratio (train loop only)", f"{r['ratio_train_runtime']:.3f}"),
        ("tokens/s TRL | alignkit", f"{t['tokens_per_s']:.0f} | {a['tokens_per_s']:.0f}"),
        ("pairs/s TRL | alignkit", f"{t['pairs_per_s']:.1f} | {a['pairs_per_s']:.1f}"),
        ("peak GPU memory TRL | alignkit", f"{mem(t)} | {mem(a)}"),
        ("loss curves identical", f"{lc['identical']} (max |diff| {lc['max_abs_diff']:.1e}, "
                                  f"{len(lc['steps_compared'])} logged steps)"),
        ("same pairs", str(r["rows_identical"])),
    ], "alignkit bench dpo", json_out)


@bench_app.command("pref")
def bench_pref(
    prompts: Annotated[int, typer.Option("--prompts", min=16, help="training prompts for on-policy pairs")] = 1024,
    k: Annotated[int, typer.Option("--k", min=2, help="SFT samples per prompt (best vs worst)")] = 4,
    eval_prompts: Annotated[int, typer.Option("--eval-prompts", min=4, help="held-out prompts")] = 64,
    betas: Annotated[list[float] | None, typer.Option("--beta", help="extra DPO β values (repeatable)")] = None,
    seed: SeedOpt = None,
    plot_out: PlotOpt = None,
    json_out: JsonOpt = None,
) -> None:
    """SFT → on-policy pairs → DPO, IPO, KTO, pairwise SPPO (+ a DPO β sweep), all evaluated against SFT."""
    from alignkit.paper_tables import preference_table

    check_seed(seed)
    r = preference_table.pref_table(n_prompts=prompts, k=k, eval_prompts=eval_prompts, seed=seed or 0,
                                    **({"betas": tuple(betas)} if betas else {}))
    m, st, p = r["machine"], r["settings"], r["pairs"]
    load = f"load avg {m['load_avg_1m']:.2f} -> {r['load_avg_1m_end']:.2f}"
    rows = [("machine", f"{m['cpu']}, {m['cores']} cores; {load}"),
            ("pairs", f"{p['pairs']} on-policy pairs (k={p['k']}, {p['select']}, oracle), mean P(chosen ≻ rejected) "
                      f"{p['mean_prob']:.3f}, mean gold gap {p['mean_gold_gap']:.3f}"),
            ("training", f"full FT from SFT, lr {st['lr']:g}, {st['epochs']:g} epoch, batch {st['batch_size']}")]
    for name, x in r["policies"].items():
        kl = round(x["kl"], 2) + 0.0  # no "-0.00" for a policy's KL to itself
        rows.append((name, f"gold {x['reward_mean']:+.3f} ± {x['reward_se']:.3f} | win vs SFT {x['win_rate']:.3f} ± "
                           f"{x['win_rate_se']:.3f} | KL {kl:.2f} ± {x['kl_se']:.2f} | len {x['mean_length']:.1f}"
                           f" | EOS {x['eos_rate']:.0%}"))
    rows.append(("total wall s", f"{r['timings']['total_s']:.0f}"))
    if plot_out is not None:
        preference_table.pref_plot(r, plot_out)
        console.print(f"wrote {plot_out}")
    _bench_out(r, rows, "alignkit bench pref", json_out)


@bench_app.command("generate")
def bench_generate(
    model: Annotated[str, typer.Option("--model", help="tiny, random-1b, or a dir")] = "tiny",
    prompts: Annotated[int, typer.Option("--prompts", min=1, help="prompts")] = 64,
    k: Annotated[int, typer.Option("--k", min=1, help="samples per prompt")] = 4,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 48,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="sequences per generate call")] = 64,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="interleaved rounds (median)")] = 5,
    device: DeviceOpt = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 or bfloat16")] = "float32",
    json_out: JsonOpt = None,
) -> None:
    """Sampling plain vs with log-probs (eval's KL) vs with hidden-state capture (Q-probe features)."""
    from alignkit import bench

    r = bench.generation_overhead(model=model, n_prompts=prompts, k=k, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, repeats=repeats, device=device or "cpu", dtype=dtype)
    m, st, med = r["machine"], r["settings"], r["median_s"]
    rows = [("machine", f"{m['gpu'] or m['cpu']}, {m['cores']} cores; load avg {m['load_avg_1m']:.2f} -> "
                        f"{r['load_avg_1m_end']:.2f}"),
            ("job", f"{model} ({st['params'] / 1e6:.1f}M params, {dtype}), {prompts} prompts x {k}, "
                    f"{max_new_tokens} new tokens, batch {batch_size}, {repeats} rounds")]
    for mode in ("plain", "logprobs", "capture"):
        rows.append((mode, f"median {med[mode]:.3f} s ({r['samples_per_s'][mode]:.1f} samples/s); runs "
                           + ", ".join(f"{x:.2f}" for x in r["seconds"][mode])))
    rows += [("ratio logprobs / plain", f"{r['ratio_logprobs']:.3f}"),
             ("ratio capture / plain", f"{r['ratio_capture']:.3f}"),
             ("same tokens in every mode", str(r["same_tokens"]))]
    _bench_out(r, rows, "alignkit bench generate", json_out)


@bench_app.command("ppo-rollout")
def bench_ppo_rollout(
    model: Annotated[str, typer.Option("--model", help="tiny, or a dir (e.g. an SFT run's model)")] = "tiny",
    prompts: Annotated[int, typer.Option("--prompts", min=1, help="prompts of the throughput runs")] = 64,
    k: Annotated[int, typer.Option("--k", min=1, help="samples per prompt")] = 1,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 48,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="sequences per generate call")] = 64,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="interleaved rounds (median)")] = 5,
    iterations: Annotated[int, typer.Option("--iterations", min=0, help="PPO iterations for the time split "
                                            "(0: skip)")] = 10,
    ppo_prompts: Annotated[int, typer.Option("--ppo-prompts", min=2, help="prompts per PPO iteration")] = 16,
    device: DeviceOpt = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 or bfloat16")] = "float32",
    json_out: JsonOpt = None,
) -> None:
    """PPO rollout throughput vs plain generation (same prompts and seed), and the PPO loop's time split."""
    from alignkit import bench

    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype must be float32 or bfloat16, got '{dtype}'")
    r = bench.ppo_rollout(model=model, n_prompts=prompts, k=k, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          repeats=repeats, iterations=iterations, ppo_prompts=ppo_prompts, device=device or "cpu",
                          dtype=dtype)
    m, st, med, sps = r["machine"], r["settings"], r["median_s"], r["samples_per_s"]
    rows = [("machine", f"{m['gpu'] or m['cpu']}, {m['cores']} cores; load avg {m['load_avg_1m']:.2f} -> "
                        f"{r['load_avg_1m_end']:.2f}"),
            ("job", f"{model} ({st['params'] / 1e6:.1f}M params, {dtype}), {prompts} prompts x {k}, "
                    f"{max_new_tokens} new tokens, batch {batch_size}, {repeats} interleaved rounds")]
    labels = {"generate": "(i) generation.generate", "sample": "(ii) rollout.sample",
              "sample_score": "(iii) sample + score_tokens (policy, ref, critic)"}
    for mode, label in labels.items():
        rows.append((label, f"median {med[mode]:.3f} s ({sps[mode]:.1f} samples/s); runs "
                            + ", ".join(f"{x:.2f}" for x in r["seconds"][mode])))
    rows += [("throughput (ii)/(i) (target ≥ 0.9): medians | per round",
              f"{r['ratio_sample_vs_generate']:.3f} | {r['median_round_ratio_sample_vs_generate']:.3f}"),
             ("throughput (iii)/(i): medians | per round",
              f"{r['ratio_sample_score_vs_generate']:.3f} | {r['median_round_ratio_sample_score_vs_generate']:.3f}"),
             ("same token ids (i), (ii), (iii)", str(r["same_tokens"]))]
    if "ppo" in r:
        p, ps = r["ppo"], r["ppo"]["settings"]
        rows.append(("ppo run", f"{ps['iterations']} iterations x {ps['prompts_per_iteration']} prompts x {ps['k']}, "
                                f"GAE, ppo_epochs {ps['ppo_epochs']}, minibatch {ps['minibatch_size']}, reward "
                                f"{ps['reward']}; wall {p['wall_s']:.1f} s (setup/save outside timers "
                                f"{p['outside_timers_s']:.1f} s)"))
        for name, sec in p["time_split_s"].items():
            rows.append((f"  {name}", f"{sec:.2f} s ({p['time_split_share'][name]:.0%})"))
    _bench_out(r, rows, "alignkit bench ppo-rollout", json_out)


@bench_app.command("ppo-memory")
def bench_ppo_memory(
    hidden: Annotated[int, typer.Option("--hidden", min=64, help="hidden size of the random Llama")] = 1024,
    layers: Annotated[int, typer.Option("--layers", min=1)] = 12,
    iterations: Annotated[int, typer.Option("--iterations", min=1, help="PPO iterations per layout")] = 2,
    device: DeviceOpt = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 or bfloat16")] = "float32",
    json_out: JsonOpt = None,
) -> None:
    """Memory of PPO with LoRA: policy, reference and critic on one shared base vs separate copies."""
    from alignkit.bench.ppo_memory import ppo_memory

    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype must be float32 or bfloat16, got '{dtype}'")
    r = ppo_memory(hidden=hidden, layers=layers, iterations=iterations, device=device or "cpu", dtype=dtype)
    m, st, peak = r["machine"], r["settings"], r["peak_gib"]
    rows = [("machine", f"{m['gpu'] or m['cpu']}, {m['cores']} cores"),
            ("job", f"random Llama {st['params'] / 1e6:.0f}M params ({dtype}, {st['weights_gib_per_copy']:.2f} GiB "
                    f"a copy), LoRA r={st['lora_r']}, GAE, {iterations} iterations x {st['prompts']} prompts x "
                    f"{st['k']}, {st['max_new_tokens']} new tokens"),
            ("measure", r["measure"]),
            ("baseline (imports + tokenizer)", f"{peak['baseline']:.2f} GiB")]
    for name in ("shared", "separate"):
        rows.append((f"{name}: loop peak | whole run (loading included)",
                     f"{r['loop_peak_gib'][name]:.2f} GiB ({r['loop_above_baseline_gib'][name]:.2f} above baseline) | "
                     f"{peak[name]:.2f} GiB"))
    live = r["live_tensors_gib"]
    rows += [("live tensors at the end of the loop: shared | separate",
              f"{live['shared']:.2f} GiB | {live['separate']:.2f} GiB"),
             ("shared / separate, live tensors (target ≤ 0.5)", f"{r['ratio_live_tensors']:.3f}"),
             ("shared / separate, loop peak RSS: total | above baseline",
              f"{r['ratio_loop_peak']:.3f} | {r['ratio_loop_above_baseline']:.3f}"),
             ("shared / separate, whole-run peak", f"{r['ratio_whole_run_peak']:.3f}")]
    _bench_out(r, rows, "alignkit bench ppo-memory", json_out)


@bench_app.command("grpo-trl")
def bench_grpo_trl(
    steps: Annotated[int, typer.Option("--steps", min=1, help="optimiser steps (= rollout batches) per run")] = 30,
    prompts: Annotated[int, typer.Option("--prompts", min=1, help="prompts per step")] = 8,
    k: Annotated[int, typer.Option("--k", min=2, help="completions per prompt (TRL num_generations)")] = 4,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 32,
    lr: Annotated[float, typer.Option("--lr", help="learning rate (AdamW, constant; > 0)")] = 1e-3,
    seeds: Annotated[list[int] | None, typer.Option("--seed", help="seeds (repeatable; one run of each side per "
                                                    "seed, the order alternating; default 0, 1, 2)")] = None,
    plot_out: Annotated[Path | None, typer.Option("--plot", help="write the reward-curve figure here",
                                                  callback=_writable("--plot"))] = None,
    json_out: JsonOpt = None,
) -> None:
    """`alignkit ppo --advantage grpo` vs TRL's GRPOTrainer on the same job: wall time and reward curves."""
    from alignkit.bench import grpo_trl

    if not lr > 0 or lr != lr or lr == float("inf"):
        raise UserError(f"--lr must be a positive number, got {lr}")
    for s in seeds or []:
        check_seed(s)
    r = grpo_trl.grpo_trl(steps=steps, n_prompts=prompts, k=k, max_new_tokens=max_new_tokens, lr=lr,
                          seeds=tuple(seeds) if seeds else (0, 1, 2))
    m, st, a, t, c = r["machine"], r["settings"], r["alignkit"], r["trl"], r["curves"]
    walls = lambda x: ", ".join(f"{run['wall_s']:.2f}" for run in x["runs"])  # noqa: E731
    se = lambda x: "" if x != x else f" ± {x:.3f}"  # noqa: E731  (NaN: no SE)
    rows = [("machine", f"{m['cpu']}, {m['cores']} cores; torch {m['torch']}, trl {m['trl']}; load avg "
                        f"{m['load_avg_1m']:.2f} -> {r['load_avg_1m_end']:.2f}"),
            ("job", f"tiny, full FT, fp32, {steps} steps x {prompts} prompts x k={k}, {max_new_tokens} new tokens, "
                    f"lr {lr:g}, no KL, 1 step per batch; seeds {st['seeds']}"),
            ("alignkit wall s", f"{walls(a)} (median {a['median_wall_s']:.2f}, {a['median_s_per_step']:.3f} s/step)"),
            ("TRL wall s", f"{walls(t)} (median {t['median_wall_s']:.2f}, {t['median_s_per_step']:.3f} s/step)"),
            ("ratio alignkit/TRL wall (target ≤ 1.05): medians | per pair",
             f"{r['ratio_wall']:.3f} | {r['median_pair_ratio_wall']:.3f}"),
            ("ratio per completion token | CPU time | inside train loop",
             f"{r['ratio_wall_per_token']:.3f} | {r['ratio_cpu']:.3f} | {r['ratio_loop']:.3f}"),
            ("mean completion length alignkit | TRL", f"{a['mean_length']:.1f} | {t['mean_length']:.1f} tokens")]
    for key, label in (("last_half", "reward, last half"), ("gain", "gain, first → last quarter")):
        x = c[key]
        rows.append((f"{label}: alignkit | TRL", f"{x['alignkit']:+.3f}{se(x['alignkit_se'])} | "
                     f"{x['trl']:+.3f}{se(x['trl_se'])} (diff {x['diff']:+.3f}{se(x['diff_se'])}, "
                     f"{'agree' if x['agree'] else 'DIFFER'})"))
    p = c["paired_by_step"]
    rows.append(("paired by step: mean alignkit − TRL", f"{p['mean_diff']:+.3f}{se(p['diff_se'])} over {p['n']} "
                                                      f"steps ({'agree' if p['agree'] else 'DIFFER'})"))
    rows.append(("same reward curve in distribution", "yes" if c["agree"] else "no"))
    if plot_out is not None:
        grpo_trl.grpo_trl_plot(r, plot_out)
        console.print(f"wrote {plot_out}")
    _bench_out(r, rows, "alignkit bench grpo-trl", json_out)


@bench_app.command("qprobe-fit")
def bench_qprobe_fit(
    n: Annotated[int, typer.Option("--n", min=10, help="synthetic features")] = 10_000,
    d: Annotated[int, typer.Option("--d", min=1, help="feature dimension")] = 4096,
    loss: Annotated[str, typer.Option("--loss", help="q, ce, pg")] = "pg",
    repeats: Annotated[int, typer.Option("--repeats", min=1)] = 3,
    json_out: JsonOpt = None,
) -> None:
    """`alignkit qprobe fit` time on n synthetic features of dimension d (paper defaults: 150 epochs)."""
    from alignkit import bench

    if loss not in ("q", "ce", "pg"):
        raise UserError(f"--loss must be q, ce or pg (got '{loss}')")
    r = bench.qprobe_fit_time(n=n, d=d, loss=loss, repeats=repeats)
    m = r["machine"]
    _bench_out(r, [
        ("machine", f"{m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}; load avg "
                    f"{m['load_avg_1m']:.2f}"),
        ("job", f"{n} x {d} features, loss {loss}, Linear(d, 1), AdamW lr 5e-5, 150 epochs, batch 1000 "
                f"({r['optimizer_steps']} steps)"),
        ("fit s (median; runs)", f"{r['median_fit_s']:.2f}; " + ", ".join(f"{x:.2f}" for x in r["fit_s"])),
        ("whole command s (median)", f"{r['median_wall_s']:.2f} (load features, fit, write run dir and plot)"),
        ("train loss first -> last", f"{r['first_train_loss']:+.4f} -> {r['last_train_loss']:+.4f}"),
    ], "alignkit bench qprobe-fit", json_out)


@bench_app.command("qprobe")
def bench_qprobe(
    train_prompts: Annotated[int, typer.Option("--train-prompts", min=8)] = 256,
    eval_prompts: Annotated[int, typer.Option("--eval-prompts", min=4)] = 64,
    n: Annotated[int, typer.Option("--n", min=32, help="samples per prompt (k up to 32)")] = 32,
    threshold: Annotated[float, typer.Option("--threshold", help="binary success: gold > T")] = 0.3,
    embed: Annotated[str | None, typer.Option("--embed", help="API mode encoder (e.g. minilm)")] = None,
    json_out: JsonOpt = None,
) -> None:
    """Q-probe on the built-in task: q / ce / pg over k = 1..32, gold and binary rewards, vs base and best-of-k."""
    from alignkit.paper_tables.qprobe_table import qprobe_table

    r = qprobe_table(n_train_prompts=train_prompts, n_eval_prompts=eval_prompts, n=n, threshold=threshold,
                     embed=embed)
    m, st = r["machine"], r["settings"]
    rows = [("machine", f"{m['cpu']}, {m['cores']} cores; load avg {m['load_avg_1m']:.2f} -> "
                        f"{r['load_avg_1m_end']:.2f}"),
            ("setup", f"{st['train_prompts']} train / {st['eval_prompts']} held-out prompts x {st['n_per_prompt']}, "
                      f"features {st['features']}, binary = gold > {threshold:g}")]
    for reward, t in r["tables"].items():
        ks = [str(k) for k in st["ks"]]
        rows.append((f"({reward}) base | greedy", f"{t['base']['mean']:+.3f} | "
                     + ("–" if not t["greedy"] else f"{t['greedy']['mean']:+.3f}")))
        for name, by_beta in t["probes"].items():
            for b, by_k in by_beta.items():
                rows.append((f"{name} β={b}", " ".join(f"{by_k[k]['mean']:+.3f}" for k in ks)))
        rows.append((f"({reward}) best-of-k", " ".join(f"{t['best_of_k'][k]['mean']:+.3f}" for k in ks)))
    rows.append(("total wall s", f"{r['timings']['total_s']:.0f}"))
    _bench_out(r, rows, f"alignkit bench qprobe (k = {', '.join(map(str, st['ks']))})", json_out)


@bench_app.command("quickstart")
def bench_quickstart(json_out: JsonOpt = None) -> None:
    """Time `alignkit quickstart` (default settings, temporary output directory)."""
    from alignkit import bench

    r = bench.quickstart_time()
    m = r["machine"]
    rows = [
        ("machine", f"{m['cpu']}, {m['cores']} cores; torch {m['torch']}, load avg {m['load_avg_1m']:.2f}"),
        ("wall s", f"{r['wall_s']:.1f} (of which SFT {r['sft_seconds']:.1f})"),
        ("SFT steps | last loss", f"{r['sft']['steps']} | {r['sft']['last_loss']:.4f}"),
    ]
    for name, p in r["policies"].items():
        rows.append((f"{name}: gold | EOS | repetition | samples/s",
                     f"{p['gold_mean']:+.3f} ± {p['gold_sd']:.3f} | {p['eos_rate']:.0%} | "
                     f"{p['repetition_rate']:.0%} | {p['samples_per_s']:.0f}"))
    _bench_out(r, rows, "alignkit bench quickstart", json_out)


@bench_app.command("rm-table1")
def bench_rm_table1(
    backbone: Annotated[str, typer.Option("--backbone", help="tiny (SFT'd tiny Llama) or minilm")] = "tiny",
    pairs: Annotated[int | None, typer.Option("--pairs", min=16, help="builtin:pairwise pairs")] = None,
    seeds: Annotated[list[int] | None, typer.Option("--seeds", help="training seeds (repeatable)")] = None,
    lams: Annotated[list[float] | None, typer.Option("--lam", help="ensemble λ (repeatable; 0 = no NNM)")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs", help="epochs per reward model")] = None,
    n_members: Annotated[int, typer.Option("--n-members", min=2, help="ensemble size N")] = 5,
    json_out: JsonOpt = None,
) -> None:
    """UP-RLHF Table 1 on the built-in task: full-FT RM vs LoRA ensembles (λ = 0 and λ > 0)."""
    from alignkit.paper_tables.rm_table1 import RM_SETTINGS, rm_table1

    if backbone not in RM_SETTINGS:
        raise UserError(f"--backbone must be one of {', '.join(RM_SETTINGS)}, got '{backbone}'")
    r = rm_table1(backbone, seeds=tuple(seeds) if seeds else None, lams=tuple(lams) if lams else None,
                  pairs=pairs, epochs=epochs, n_members=n_members)
    st, m = r["settings"], r["machine"]
    fmt = lambda x, k, d=3: "–" if x[k] is None else (  # noqa: E731
        f"{x[k]:.{d}f}" + (f" ± {x[k + '_sd']:.{d}f}" if x.get(k + "_sd") is not None else ""))
    load = f"load avg {m['load_avg_1m']:.2f} -> {r['load_avg_1m_end']:.2f}"
    rows = [("machine", f"{m['cpu']}, {m['cores']} cores; {load}"),
            ("setup", f"{backbone}, {st['pairs']} pairs ({st['eval_fraction']:.0%} held out), {st['epochs']} epochs, "
                      f"lr full {st['full_lr']:g} / LoRA {st['lora_lr']:g}, r={st['lora_r']}, seeds {st['seeds']}")]
    if "sft_backbone" in r:
        rows.append(("SFT backbone s", f"{r['sft_backbone']['wall_s']:.1f}"))
    for x in r["rows"]:
        rows.append((x["row"], f"acc {fmt(x, 'accuracy')} | ECE {fmt(x, 'ece')} | ECE std {fmt(x, 'ece_standard')} | "
                               f"u in/OOD {fmt(x, 'uncertainty_in_dist')}/{fmt(x, 'uncertainty_ood')} | "
                               f"AUROC {fmt(x, 'ood_auroc')} | {x['trainable_pct']:.2f}% | "
                               f"train {fmt(x, 'train_runtime_s', 1)} s"))
    rows.append(("total wall s", f"{r['total_wall_s']:.0f}"))
    _bench_out(r, rows, f"alignkit bench rm-table1 --backbone {backbone}", json_out)


@bench_app.command("rm-scoring")
def bench_rm_scoring(
    backbone: Annotated[str, typer.Option("--backbone", help="tiny, minilm, or random-llama (a ~0.8 B random "
                                          "Llama: for a GPU)")] = "tiny",
    n_members: Annotated[int, typer.Option("--n-members", min=2, help="ensemble size N")] = 5,
    batch: Annotated[int, typer.Option("--batch", min=1, help="texts per forward")] = 32,
    rows: Annotated[int, typer.Option("--rows", min=1, help="texts scored per timed pass")] = 512,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="timed passes (median)")] = 3,
    top_layers: Annotated[int, typer.Option("--top-layers", min=1, help="blocks the shared / shared-loop "
                                            "ensembles adapt, from the top")] = 1,
    device: DeviceOpt = None,
    json_out: JsonOpt = None,
) -> None:
    """Ensemble scoring (mixed, loop, shared trunk) vs N separate reward models vs one: samples/s, memory."""
    from alignkit import bench

    if backbone not in bench.SCORING_BACKBONES:
        raise UserError(f"--backbone must be one of {', '.join(bench.SCORING_BACKBONES)}, got '{backbone}'")
    from alignkit.placement import choose_device

    on = str(choose_device(device or "cpu"))  # one line when no GPU is visible
    r = bench.rm_scoring(backbone, n_members=n_members, batch=batch, rows=rows, repeats=repeats, top_layers=top_layers,
                         device=on)
    m, c, q = r["machine"], r["configs"], r["ratios"]
    out = [("machine", f"{m['cpu']}, {m['cores']} cores; load avg {m['load_avg_1m']:.2f} -> "
                       f"{r['load_avg_1m_end']:.2f}"),
           ("setup", f"{backbone} on {on}, N={n_members}, batch {batch}, {rows} texts x {repeats} passes, "
                     "fresh process each")]
    memory, key = ("peak GPU", "peak_gpu_mib") if on.startswith("cuda") else ("peak RSS Δ", "peak_rss_delta_mib")
    for name in bench.SCORING_CONFIGS:
        mem = "–" if q[name]["memory_vs_one"] is None else f"{q[name]['memory_vs_one']:.2f}x one"
        out.append((name, f"{c[name]['samples_per_s']:.1f} samples/s ({q[name]['throughput_vs_one']:.3f}x one) | "
                          f"{memory} {c[name][key]:.0f} MiB ({mem})"))
    forwards = [name for name in bench.SCORING_CONFIGS if name not in ("one", "separate")]
    out.append((f"vs separate, samples per CPU s ({' | '.join(forwards)})",
                " | ".join(f"{q[f'{m}_vs_separate_per_cpu_s']:.2f}x" for m in forwards)))
    out.append(("pooled last block", f"shared-loop {q['shared-loop_vs_unpooled_throughput']:.2f}x "
                                     "shared-loop-unpooled (samples/s)"))
    _bench_out(r, out, f"alignkit bench rm-scoring --backbone {backbone} --device {on}", json_out)


@bench_app.command("sppo")
def bench_sppo(
    iterations: Annotated[int, typer.Option("--iterations", min=1, help="T iterations per loss")] = 3,
    prompts: Annotated[int, typer.Option("--prompts", min=4, help="prompts per iteration")] = 256,
    k: Annotated[int, typer.Option("--k", min=2, help="K samples per prompt")] = 4,
    eval_prompts: Annotated[int, typer.Option("--eval-prompts", min=8, help="held-out prompts for win rates")] = 128,
    lr: Annotated[float, typer.Option("--lr", min=1e-9, help="learning rate (AdamW)")] = 5e-4,
    seed: SeedOpt = None,
    plot_out: PlotOpt = None,
    json_out: JsonOpt = None,
) -> None:
    """Iterative SPPO vs iterative DPO and IPO on the built-in task: win rates, LC, gold, KL per iteration."""
    from alignkit.paper_tables import sppo_table

    check_seed(seed)
    r = sppo_table.sppo_table(iterations=iterations, prompts_per_iteration=prompts, k=k, eval_prompts=eval_prompts,
                              learning_rate=lr, seed=seed or 0)
    m, st, sc = r["machine"], r["settings"], r["scoring"]
    rows = [("machine", f"{m['cpu']}, {m['cores']} cores"),
            ("setup", f"SFT (quickstart) → T={st['iterations']} × {st['prompts_per_iteration']} prompts × K={st['k']}, "
                      f"oracle preference, AdamW lr {st['learning_rate']:g}, η={st['eta']:g} (sppo), "
                      f"β={st['beta_dpo_ipo']:g} (dpo, ipo); {st['eval_prompts']} held-out prompts; "
                      f"{r['wall_s'] / 60:.1f} min"),
            ("SFT (iteration 0)", f"gold {r['base'].get('gold', float('nan')):+.3f}, length {r['base']['length']:.1f}")]
    for loss, its in r["runs"].items():
        for it in its:
            t = it["time_s"]
            rows.append((f"{loss} iteration {it['iteration']}",
                         f"win vs SFT {it['win_rate_vs_base']:.3f}, vs prev {it['win_rate_vs_previous']:.3f}, "
                         f"LC {it['lc_win_rate_vs_base']:.3f}, gold {it.get('gold', float('nan')):+.3f}, "
                         f"len {it['length']:.1f}, KL {it['kl_to_base']:.2f}; {it['pairs']} pairs; s: "
                         + ", ".join(f"{name} {sec:.1f}" for name, sec in t.items())))
    rows.append(("K×K judging, oracle", f"{sc['pairs']} pairs: one batched call {sc['batched_s'] * 1e3:.1f} ms vs one "
                                        f"call per pair {sc['per_pair_s'] * 1e3:.0f} ms ({sc['speedup']:.0f}×), "
                                        f"same matrix {sc['same_matrix']}"))
    if plot_out is not None:
        sppo_table.sppo_plot(r, plot_out)
        console.print(f"wrote {plot_out}")
    _bench_out(r, rows, "alignkit bench sppo", json_out)


@bench_app.command("up-rlhf")
def bench_up_rlhf(
    pairs: Annotated[int, typer.Option("--pairs", min=16, help="oracle-labelled pairs the proxies train on")] = 256,
    iterations: Annotated[int, typer.Option("--iterations", min=2, help="PPO iterations per run")] = 60,
    prompts: Annotated[int, typer.Option("--prompts", min=2, help="prompts per PPO iteration")] = 16,
    rm_epochs: Annotated[float, typer.Option("--rm-epochs", min=0.01, help="epochs per proxy")] = 2.0,
    n_members: Annotated[int, typer.Option("--n-members", min=2, help="ensemble size N")] = 5,
    beta2: Annotated[float, typer.Option("--beta2", min=0.0, help="(c)'s uncertainty penalty β2 (eq. 14)")] = 1.0,
    plain: Annotated[bool, typer.Option("--plain-ensemble/--no-plain-ensemble",
                                        help="also a λ = 0 ensemble and a PPO run on its mean (Fig. 3)")] = False,
    ppo_seeds: Annotated[list[int] | None, typer.Option("--ppo-seed", help="PPO seeds (repeatable; curves are "
                                                        "averaged over them; default: --seed)")] = None,
    seed: SeedOpt = None,
    plot_out: PlotOpt = None,
    json_out: JsonOpt = None,
) -> None:
    """UP-RLHF on the built-in task: PPO on a full-FT RM (KL in reward) vs ensemble mean vs UP-RLHF, gold vs proxy."""
    from alignkit.paper_tables import up_rlhf

    check_seed(seed)
    r = up_rlhf.up_rlhf_table(pairs=pairs, iterations=iterations, prompts_per_iteration=prompts, rm_epochs=rm_epochs,
                              n_members=n_members, beta2=beta2, plain_ensemble=plain, seed=seed or 0,
                              ppo_seeds=tuple(ppo_seeds) if ppo_seeds else None)
    m, st = r["machine"], r["settings"]
    rows = [("machine", f"{m['cpu']}, {m['cores']} cores; load avg {m['load_avg_1m']:.2f} -> "
                        f"{r['load_avg_1m_end']:.2f}"),
            ("setup", f"{st['pairs']} pairs ({st['eval_fraction']:.0%} held out), {st['rm_epochs']:g} epoch(s); "
                      f"{st['iterations']} iterations x {st['prompts_per_iteration']} prompts; kl_coef "
                      f"{st['kl_coef']:g}, β1 {st['beta1']:g}, β2 {st['beta2']:g}; "
                      f"N={st['n_members']}, λ={st['lam']:g}; PPO seeds {st['ppo_seeds']} (curves averaged)")]
    for name, p in r["proxies"].items():
        rows.append((f"proxy {name}", f"held-out accuracy {p['accuracy']:.3f} on {p['eval_pairs']} pairs"
                     + (f", mean u {p['uncertainty_in_dist']:.3f}" if name != "rm" else "")))
    for x in r["runs"].values():
        s = x["stats"]
        rows.append((x["label"], f"gold start {s['start_gold']:+.3f} | peak {s['peak_gold']:+.3f} "
                                 f"(it {s['peak_gold_iteration']}, KL {s['peak_gold_kl']:.2f}) | "
                                 f"final {s['final_gold']:+.3f} ± {s['final_gold_se']:.3f}"
                                 f" | proxy {s['start_proxy']:+.3f} -> {s['final_proxy']:+.3f} | final KL "
                                 f"{s['final_kl']:.2f} | over-optimised {'yes' if s['over_optimised'] else 'no'}"))
    rows.append(("total wall s", f"{r['timings']['total_s']:.0f}"))
    if plot_out is not None:
        up_rlhf.up_rlhf_plot(r, plot_out)
        console.print(f"wrote {plot_out}")
    _bench_out(r, rows, "alignkit bench up-rlhf", json_out)
