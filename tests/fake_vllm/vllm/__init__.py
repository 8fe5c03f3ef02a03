"""A fake `vllm` for the tests of alignkit/vllm_backend.py (no CUDA, no vLLM on the test machines).

It keeps vLLM's offline API as alignkit uses it and its output conventions, checked against vLLM's
source (vllm/outputs.py, vllm/sampling_params.py, v1/engine/parallel_sampling.py, v1/core/sched/utils.py):
- `LLM(model=..., **engine_args)`; `LLM.generate([{"prompt_token_ids": ids}], sampling_params=[...])`
  returns one `RequestOutput` per prompt, in order, each with `n` `CompletionOutput`s;
- child j of a request seeded s is seeded s + j; temperature 0 is greedy;
- generation stops at the model's EOS or a `stop_token_ids` id, which stays in `token_ids`
  (finish_reason "stop"), or at `max_tokens` ("length");
- `logprobs=0` gives, per generated token, {token id: Logprob} of the sampled token from the raw logits;
- `llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights([(name, tensor)])` takes
  checkpoint names and raises KeyError on a name the model does not have.
Sampling runs the HF model on CPU one sequence at a time, so greedy outputs equal HF `generate`'s.
Every engine and every `load_weights` / `reset_prefix_cache` call is recorded in `CALLS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__version__ = "0.30.0"  # pretends to be inside alignkit's supported range
CALLS: dict[str, list[Any]] = {name: [] for name in ("engines", "load_weights", "reset_prefix_cache", "generate",
                                                     "cleanup")}


def reset_calls() -> None:
    for calls in CALLS.values():
        calls.clear()


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int | None = 16
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    detokenize: bool = True


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


class _RunnerModel:
    """What vLLM's model runner holds: `load_weights` takes (checkpoint name, tensor) pairs."""

    def __init__(self, hf_model: torch.nn.Module) -> None:
        self.hf_model = hf_model

    def load_weights(self, weights: Any) -> set[str]:
        state = self.hf_model.state_dict()
        loaded = set()
        for name, tensor in weights:
            if name not in state:
                raise KeyError(name)  # vLLM's params_dict[name]
            if tuple(state[name].shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {tuple(state[name].shape)}")
            with torch.no_grad():
                state[name].copy_(tensor.to(state[name].dtype))
            CALLS["load_weights"].append(name)
            loaded.add(name)
        return loaded


class _Namespace:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


class LLM:
    def __init__(self, model: str, **engine_args: Any) -> None:
        from transformers import AutoModelForCausalLM

        CALLS["engines"].append({"model": model, **engine_args})
        self.hf_model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        runner = _RunnerModel(self.hf_model)
        self.llm_engine = _Namespace(model_executor=_Namespace(driver_worker=_Namespace(
            model_runner=_Namespace(model=runner))))
        self.eos_token_id = self.hf_model.generation_config.eos_token_id

    def reset_prefix_cache(self) -> bool:
        CALLS["reset_prefix_cache"].append(True)
        return True

    def generate(self, prompts: list[dict], sampling_params: Any = None, use_tqdm: bool = True) -> list[RequestOutput]:
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        CALLS["generate"].append({"prompts": [p["prompt_token_ids"] for p in prompts], "params": params})
        return [RequestOutput(request_id=str(i), prompt=None, prompt_token_ids=list(p["prompt_token_ids"]),
                              outputs=[self._child(p["prompt_token_ids"], sp, j) for j in range(sp.n)])
                for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]

    @torch.no_grad()
    def _child(self, prompt_ids: list[int], sp: SamplingParams, index: int) -> CompletionOutput:
        eos = self.eos_token_id
        stops = set(sp.stop_token_ids or []) | ({eos} if isinstance(eos, int) and not sp.ignore_eos else set())
        greedy = sp.temperature < 1e-5
        kw: dict[str, Any] = {"do_sample": False} if greedy else {
            "do_sample": True, "temperature": sp.temperature, "top_p": sp.top_p, "top_k": sp.top_k or None}
        with torch.random.fork_rng(devices=[]):
            if sp.seed is not None:
                torch.manual_seed(sp.seed + index)
            out = self.hf_model.generate(
                torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=sp.max_tokens, eos_token_id=sorted(stops), pad_token_id=sorted(stops)[0],
                output_logits=True, return_dict_in_generate=True, **kw)
        ids = out.sequences[0, len(prompt_ids):].tolist()
        finished = bool(ids) and ids[-1] in stops
        logprobs = None
        if sp.logprobs is not None:
            logprobs = [{tok: Logprob(float(torch.log_softmax(step[0].float(), -1)[tok]), rank=1)}
                        for step, tok in zip(out.logits, ids, strict=False)]
        return CompletionOutput(
            index=index, text="", token_ids=ids, cumulative_logprob=None, logprobs=logprobs,
            finish_reason="stop" if finished else "length",
            stop_reason=ids[-1] if finished and ids[-1] != eos else None,
        )
