"""The vLLM sampling backend (`--backend vllm`, extra `alignkit[vllm]`, a CUDA GPU).

`VLLMEngine` samples K completions per prompt from prompt token ids with a colocated, in-process vLLM
`LLM` and returns the same `generation.Sample` objects as `generation.generate` (the same prompt ids,
EOS cut, decoding and `finished` semantics), so every caller reads one format. `sync_weights(model)`
pushes a policy's current weights into the engine after an update (a peft LoRA policy is merged,
pushed under its base model's parameter names, then unmerged), as TRL's colocated vLLM does.
`check_backend` makes the cheap checks (vLLM installed, a CUDA GPU visible) before any model loads.

Only the fake `vllm` package of the tests (tests/fake_vllm/) has exercised this module; what that
covers and what it does not, and the seeding and dtype rules: docs/vllm.md.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from alignkit import generation
from alignkit.errors import UserError

BACKENDS = ("hf", "vllm")
INSTALL_HINT = "pip install 'alignkit[vllm]' (needs a CUDA GPU)"
# the range TRL 1.16's colocated vLLM generation supports (trl.import_utils.is_vllm_available)
SUPPORTED_VLLM = ">=0.22,<0.32,!=0.31.*"  # pyproject.toml's vllm extra


def _vllm_installed() -> bool:
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):  # a broken or half-removed install
        return False


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def check_backend(backend: str, device: str | None = "auto") -> None:
    """The sampling backend, checked without loading anything: call before any model is loaded. `hf` is
    always available; `vllm` needs the package (extra `alignkit[vllm]`) and a visible CUDA GPU, and runs
    on the current GPU (`--device auto` or `cuda`; pick another with CUDA_VISIBLE_DEVICES)."""
    if backend not in BACKENDS:
        raise UserError(f"--backend must be hf or vllm (got {backend!r})")
    if backend == "hf":
        return
    if not _vllm_installed():
        raise UserError(f"--backend vllm needs vLLM, which is not installed: {INSTALL_HINT}")
    if not _cuda_available():
        raise UserError("--backend vllm needs a CUDA GPU and none is visible here: use --backend hf")
    if (device or "auto") not in ("auto", "cuda"):
        raise UserError(f"--backend vllm runs on the current CUDA GPU, not --device {device}: use --device auto "
                        "(choose the GPU with CUDA_VISIBLE_DEVICES) or --backend hf")


def _request_seed(seed: int, prompt: int) -> int:
    """The seed of prompt `prompt`'s request. vLLM gives child j of a request with n = K the seed
    `request seed + j`, so sample (i, j) draws from its own stream, whatever the batch around it."""
    import numpy as np

    return int(np.random.SeedSequence([seed, prompt]).generate_state(1)[0])  # 32 bits: room for + j


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMEngine:
    """A colocated vLLM engine that samples like `generation.generate` (see the module docstring).

    `model_dir`: a full model directory (or hub id) vLLM loads; `tokenizer`: the HF tokenizer alignkit
    formats prompts with and decodes completions with (vLLM never tokenizes or detokenizes);
    `max_positions`: the model's context length (caps `max_new_tokens` as the HF path does);
    `eos_ids`: every id that ends a completion (generation config + tokenizer, as the HF path).
    """

    def __init__(self, model_dir: str, tokenizer: Any, *, eos_ids: list[int], max_positions: int | None,
                 dtype: str = "auto", seed: int = 0, gpu_memory_utilization: float = 0.9,
                 enable_prefix_caching: bool = True, tokenizer_dir: str | None = None) -> None:
        if not 0 < gpu_memory_utilization <= 1:
            raise UserError(f"vLLM gpu_memory_utilization must be in (0, 1] (got {gpu_memory_utilization})")
        try:
            from vllm import LLM
        except ImportError as err:
            raise UserError(f"--backend vllm: vLLM failed to import ({str(err).splitlines()[0][:160]}): "
                            f"{INSTALL_HINT}, version {SUPPORTED_VLLM}") from err
        self.tokenizer, self.eos_ids, self.max_positions = tokenizer, list(eos_ids), max_positions
        self.model_dir = model_dir
        # In-process engine, one per rank (TRL's colocate mode): `external_launcher` runs vLLM's worker in
        # this process, which `sync_weights` needs to reach the model, and uses the launcher's rank variables.
        self._owns_process_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        self.llm = LLM(
            model=model_dir,
            tokenizer=tokenizer_dir or model_dir,
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching,  # the K samples of a prompt share its prefill
            distributed_executor_backend="external_launcher",
            max_model_len=max_positions,
            max_num_batched_tokens=4096,  # as TRL: vLLM v1's memory profiler misreads the colocated default
            # sample from the model's own distribution: no repetition penalty etc. from generation_config.json
            generation_config="vllm",
        )

    # ----------------------------------------------------------------------------------------- build
    @classmethod
    def from_spec(cls, spec: str, *, dtype: str = "auto", seed: int = 0, gpu_memory_utilization: float = 0.9,
                  trust_remote_code: bool = False, tokenizer: Any | None = None) -> tuple[VLLMEngine, Any]:
        """(engine, tokenizer) for a policy spec `models.load_causal_lm` takes (run dir, model dir, alias,
        tiny, adapter dir). A full model is loaded by vLLM alone; a LoRA adapter's base is loaded by vLLM
        and the merged weights (adapter + base, loaded once on CPU) are pushed with `sync_weights`.
        `tokenizer`: the one the caller already holds for this spec (a training loop's), else it is loaded."""
        from alignkit import models

        if trust_remote_code:
            raise UserError("--backend vllm does not run a model's own code: use --backend hf")
        path = models._resolve_for_weights(spec)
        base = models._adapter_base(path)
        weights_dir = models._resolve_for_weights(base) if base else path
        tokenizer = tokenizer if tokenizer is not None else models.load_tokenizer(path)
        eos, positions = _model_facts(weights_dir, tokenizer)
        name = str(models.choose_dtype(dtype, "cuda")).removeprefix("torch.")  # alignkit's `auto`: bf16 if able
        engine = cls(weights_dir, tokenizer, eos_ids=eos, max_positions=positions, dtype=name, seed=seed,
                     gpu_memory_utilization=gpu_memory_utilization,
                     tokenizer_dir=path if Path(path).is_dir() else None)
        if base:
            merged, _ = models.load_causal_lm(spec, dtype=dtype, device="cpu")
            engine.sync_weights(merged)
            del merged
            gc.collect()
        return engine, tokenizer

    # -------------------------------------------------------------------------------------- sampling
    def generate(self, prompts: list[generation.Prompt], k: int = 1, max_new_tokens: int = 48,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, do_sample: bool = True,
                 batch_size: int = 32, seed: int = 0, progress: bool = True, join: str = generation.DEFAULT_JOIN,
                 chat: str | bool = "off", capture_layer: int | None = None, stats: dict[str, float] | None = None,
                 return_logprobs: bool = False) -> list[generation.Sample]:
        """`generation.generate`'s contract, sampled by vLLM: K samples per prompt, prompt-major.

        `batch_size` is accepted and unused (vLLM schedules by its KV-cache memory). Sample j of prompt i
        is seeded `_request_seed(seed, i) + j`; greedy decoding samples once and repeats it K times."""
        from vllm import SamplingParams

        if capture_layer is not None:
            raise ValueError("capture_layer needs the model's hidden states: sample with the hf backend")
        generation.check_settings(k, max_new_tokens, temperature, top_p, batch_size)
        shown, encoded = generation.render_prompts(self.tokenizer, prompts, chat, join)
        max_new_tokens = generation.fit_new_tokens(SimpleNamespace(max_position_embeddings=self.max_positions),
                                                   encoded, max_new_tokens)
        greedy = temperature == 0 or not do_sample
        n = 1 if greedy else k
        params = [
            SamplingParams(
                n=n, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
                top_k=0 if greedy else top_k, max_tokens=max_new_tokens, seed=_request_seed(seed, i),
                stop_token_ids=self.eos_ids, detokenize=False, logprobs=0 if return_logprobs else None,
            )
            for i in range(len(prompts))
        ]
        start = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], sampling_params=params,
                                    use_tqdm=progress)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(prompts)} prompts")
        samples: list[generation.Sample] = []
        for i, request in enumerate(outputs):
            completions = sorted(request.outputs, key=lambda c: c.index)
            if len(completions) != n:
                raise RuntimeError(f"vLLM returned {len(completions)} completions for prompt {i}, not {n}")
            cut = [self._cut(c) for c in completions]
            decoded = self.tokenizer.batch_decode([ids for ids, *_ in cut], skip_special_tokens=True)
            for j in range(k):
                ids, finished, eos, logprob = cut[j % n]
                samples.append(generation.Sample(
                    prompt=shown[i], completion=decoded[j % n], finished=finished, n_tokens=len(ids), index=j,
                    token_ids=ids, logprob=logprob if return_logprobs else None,
                    eos_token_id=eos if finished else None,
                ))
        seconds = time.perf_counter() - start
        if stats is not None:
            tokens = sum(s.n_tokens for s in samples)
            stats.update(n_samples=len(samples), seconds=seconds, samples_per_s=len(samples) / max(seconds, 1e-9),
                         tokens_per_s=tokens / max(seconds, 1e-9), max_new_tokens=max_new_tokens)
        return samples

    def _cut(self, completion: Any) -> tuple[list[int], bool, int | None, float | None]:
        """(ids before the first EOS, finished, the EOS id, summed log-prob through the EOS) of one vLLM
        `CompletionOutput`. vLLM keeps the stop token in `token_ids`; the cut is the HF path's
        (`generation._split_completions`): at the first id of `eos_ids`."""
        ids = list(completion.token_ids)
        end = next((t for t, tok in enumerate(ids) if tok in self.eos_ids), None)
        if end is not None:
            kept, finished, eos = ids[:end], True, ids[end]
        elif completion.finish_reason == "stop":  # stopped on a token it left out of token_ids
            stop = completion.stop_reason
            kept, finished, eos = ids, True, stop if isinstance(stop, int) else self.eos_ids[0]
        else:
            kept, finished, eos = ids, False, None
        logprob = None
        if completion.logprobs is not None:  # one {token id: Logprob} per generated token, raw (unscaled)
            steps = kept + ([eos] if finished and end is not None else [])
            logprob = float(sum(completion.logprobs[t][tok].logprob for t, tok in enumerate(steps)))
        return kept, finished, eos, logprob

    # ---------------------------------------------------------------------------------- weight sync
    def sync_weights(self, model: torch.nn.Module) -> int:
        """Push `model`'s current weights into the engine (after each policy update); returns how many
        tensors were pushed. Reaches vLLM's model in this process as TRL's colocate mode does, then resets
        the prefix cache (its KV entries were computed with the old weights)."""
        runner = self._vllm_model()
        pushed = 0
        with torch.no_grad():
            for name, tensor in vllm_named_weights(model):
                runner.load_weights([(name, tensor)])
                pushed += 1
        self.llm.reset_prefix_cache()
        return pushed

    def _vllm_model(self) -> Any:
        try:
            return self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError as err:
            raise RuntimeError(
                "this vLLM does not expose its model in-process (llm_engine.model_executor.driver_worker."
                f"model_runner.model), which weight sync needs: use vLLM {SUPPORTED_VLLM}") from err

    def close(self) -> None:
        """Free the engine's GPU memory (before the next model loads). The process group is torn down only
        when the engine created it (a one-process command), never a launched run's own. A second call is a
        no-op."""
        if self.llm is None:
            return
        self.llm = None
        gc.collect()
        if self._owns_process_group:
            try:
                from vllm.distributed import cleanup_dist_env_and_memory
            except ImportError:
                pass
            else:
                cleanup_dist_env_and_memory()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def vllm_named_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight of `model` under the names of its base checkpoint, which is what
    vLLM's `load_weights` expects. A peft LoRA model is merged for the walk (W + BA) and unmerged after,
    so the adapters keep training; its LoRA tensors are skipped, `base_model.model.` / `.base_layer` are
    dropped from the names, and a `modules_to_save` copy replaces its original. Tied weights come once
    (named_parameters dedups them), as vLLM wants."""
    sharded = next((n for n, p in model.named_parameters() if hasattr(p, "ds_id") or type(p).__name__ == "DTensor"
                    or type(p).__name__ == "FlatParameter"), None)
    if sharded is not None:  # a ZeRO-3 / FSDP shard is not the whole tensor vLLM must receive
        raise UserError(f"--backend vllm pushes whole weights after each update, but {sharded} is sharded "
                        "(DeepSpeed ZeRO-3 or FSDP): use ZeRO-2 / DDP, or --backend hf")
    peft = hasattr(model, "merge_adapter") and hasattr(model, "peft_config")
    if not peft:
        for name, param in model.named_parameters():
            yield name, param.data
        return
    prefix = getattr(model, "prefix", "lora_")
    model.merge_adapter()
    try:
        for name, param in model.named_parameters():
            if prefix in name or "original_module" in name:
                continue
            name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            yield name.replace("modules_to_save.default.", ""), param.data
    finally:
        model.unmerge_adapter()


def _model_facts(model_dir: str, tokenizer: Any) -> tuple[list[int], int | None]:
    """(EOS ids, max positions) of a model directory, from its config files only (no weights)."""
    from transformers import AutoConfig, GenerationConfig

    from alignkit.models import max_positions

    config = AutoConfig.from_pretrained(model_dir)
    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: the model config's EOS
        gen = GenerationConfig.from_model_config(config)
    eos = generation.eos_ids(SimpleNamespace(generation_config=gen), tokenizer)
    if not eos:
        raise UserError(f"model '{model_dir}' names no EOS token (config or tokenizer): completions could not end")
    return eos, max_positions(config)


__all__ = ["BACKENDS", "INSTALL_HINT", "VLLMEngine", "check_backend", "vllm_named_weights"]
