"""Learned reward models: one sequence-classification model, or UP-RLHF's LoRA ensemble.

`RewardEnsemble` holds N LoRA members, each with its own copy of the scalar head, on ONE frozen base
(UP-RLHF eq. 12); `RewardModelScorer` and `EnsembleScorer` score with them behind the `Scorer`
protocol (ensemble uncertainty = population std over members, eq. 13). `reward_texts` / `encode` make
the reward-model input: `prompt + completion` (or the chat template), truncated from the LEFT so the
completion's last token, where the head reads the reward, is always kept. Specs, input text, the
ensemble's modes, offsets and on-disk layout: docs/rewards.md. Use them through `alignkit.rewards`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch

from alignkit import models, pooled_block
from alignkit.errors import UserError
from alignkit.scoring import Scores, checked_scores

Mode = Literal["mixed", "loop", "shared", "shared-loop"]
REWARD_CONFIG = "alignkit_reward.json"  # written next to an `alignkit rm` model: {"max_length": ...}


# --------------------------------------------------------------------------- text and tokens


def reward_texts(tokenizer: Any, prompts: Sequence, completions: Sequence) -> list[str]:
    """The reward-model input of each (prompt, completion): `prompt + completion` for strings, the
    chat template over prompt + completion messages for conversations (a plain string on one side
    becomes a user / assistant message)."""
    from alignkit.data import apply_chat_template_if_any

    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    texts = []
    for p, c in zip(prompts, completions):
        if isinstance(p, str) and isinstance(c, str):
            texts.append(p + c)
            continue
        p = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        c = [{"role": "assistant", "content": c}] if isinstance(c, str) else list(c)
        texts.append(apply_chat_template_if_any(tokenizer, p + c, add_generation_prompt=False))
    return texts


def context_length(model: Any, max_length: int) -> int:
    """`max_length` capped at the model's position limit (longer inputs would index past it)."""
    return min(max_length, models.max_positions(model) or max_length)


def encode(tokenizer: Any, texts: list[str], max_length: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """ONE batched tokenizer call: right padding, left truncation (keeps the completion's end)."""
    bos = getattr(tokenizer, "bos_token", None)
    # a chat template that already writes BOS must not get a second one from the tokenizer
    add_special = not (bos and texts and all(t.startswith(bos) for t in texts))
    sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "right", "left"
    try:
        batch = tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=max_length,
            add_special_tokens=add_special,
            return_tensors="pt",
        )
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------- the LoRA ensemble


def _set_requires_grad_from(params: list[torch.nn.Parameter], flags: list[bool]) -> None:
    for p, flag in zip(params, flags):
        p.requires_grad_(flag)


def layer_list(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The transformer's block list (Llama `model.layers`, BERT `encoder.layer`, ...): the ModuleList
    with `config.num_hidden_layers` entries; None when there is no such single list."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and n_layers and len(m) == n_layers]
    return found[0] if len(found) == 1 else None


def resolve_layers(layers: int | Sequence[int] | None, n_layers: int) -> list[int] | None:
    """`lora.layers_to_transform` as peft takes it: sorted layer indices, negatives counted from the
    top (-1 = the last layer); a UserError names an index outside 0 … n_layers-1."""
    if layers is None:
        return None
    given = [layers] if isinstance(layers, int) else list(layers)
    if not given:
        raise UserError("lora.layers_to_transform is empty: list the layers to adapt, e.g. [-2, -1], or leave it out")
    out = set()
    for i in given:
        if not -n_layers <= int(i) < n_layers:
            raise UserError(f"lora.layers_to_transform: layer {i} does not exist (the model has {n_layers} "
                            f"layers: 0 … {n_layers - 1}, or -1 … -{n_layers} from the top)")
        out.add(int(i) % n_layers)
    return sorted(out)


def _first_adapted_layer(peft_model: torch.nn.Module) -> int:
    """Index of the lowest block holding a LoRA or a member-owned (modules_to_save) module; 0 when the
    blocks cannot be found or something outside them (an embedding) is adapted: no shared trunk then.
    A modules_to_save wrapper outside the blocks is the scalar head, which comes after them."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    blocks = layer_list(peft_model.get_base_model())
    if blocks is None:
        return 0
    inside = {id(m) for block in blocks for m in block.modules()}
    for m in peft_model.modules():
        if isinstance(m, BaseTunerLayer) and id(m) not in inside:
            return 0
    for i, block in enumerate(blocks):
        if any(isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)) for m in block.modules()):
            return i
    return len(blocks)


class _TrunkOnce:
    """For a loop over members: the first member's forward runs blocks 0 … k-1 (no member adapts
    them) and their output is kept; after `replay()` each of those blocks returns it without computing
    (an instance `forward`, removed on exit), so later members run only the adapted blocks."""

    def __init__(self, blocks: torch.nn.ModuleList, k: int) -> None:
        self.blocks, self.k = blocks, k
        self.output: Any = None

    def _keep(self, module: Any, args: tuple, output: Any) -> None:
        self.output = output

    def replay(self) -> None:
        self.handle.remove()
        for block in self.blocks[: self.k]:
            block.forward = lambda *args, **kwargs: self.output

    def __enter__(self) -> _TrunkOnce:
        self.handle = self.blocks[self.k - 1].register_forward_hook(self._keep)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()
        for block in self.blocks[: self.k]:
            block.__dict__.pop("forward", None)
        self.output = None


class _SharedTrunk:
    """Forward hooks that run blocks 0 … k-1 (no member adapts them) on B rows instead of the N·B rows
    of the mixed batch, and repeat their output N times at the fork (docs/algorithms/rm-ensemble.md,
    "Shared trunk"). Every tensor argument of a trunk block whose first dimension is N·B (the hidden
    states, the attention mask) is cut to its first B rows, which are the batch itself: the mixed
    batch is the batch repeated N times."""

    def __init__(self, blocks: torch.nn.ModuleList, k: int, n: int, b: int) -> None:
        self.blocks, self.k, self.n, self.b = blocks, k, n, b
        self.handles: list[Any] = []

    def _cut(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == self.n * self.b:
            return x[: self.b]
        return x

    def _pre(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return tuple(self._cut(a) for a in args), {key: self._cut(v) for key, v in kwargs.items()}

    def _fork(self, module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        def repeat(h: torch.Tensor) -> torch.Tensor:
            return h.repeat(self.n, *([1] * (h.dim() - 1)))

        return (repeat(output[0]), *output[1:]) if isinstance(output, tuple) else repeat(output)

    def __enter__(self) -> _SharedTrunk:
        for block in self.blocks[: self.k]:
            self.handles.append(block.register_forward_pre_hook(self._pre, with_kwargs=True))
        self.handles.append(self.blocks[self.k - 1].register_forward_hook(self._fork, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()


class RewardEnsemble(torch.nn.Module):
    """N LoRA reward members with their own heads on one frozen base (UP-RLHF eq. 12).

    `forward(input_ids, attention_mask, mode)` -> (N, B) member rewards, differentiable w.r.t. every
    member's LoRA weights and head in both modes:

    * "mixed": ONE forward of the batch repeated N times with peft's `adapter_names=` (member n
      scores rows n·B … n·B+B−1). peft allows this only in eval mode, which is how the ensemble
      always runs (dropout off, docs/rewards.md); gradients still flow to every member.
    * "loop": N forwards, one per member, after `set_adapter` (which freezes the inactive members:
      the members' requires_grad flags are saved before and restored after).
    * "shared": "mixed", but the `shared_layers` blocks below the members' first adapted block are
      run on the B rows once and forked N ways above them (`_SharedTrunk`; the embedding lookup still
      sees the N·B rows). The same rewards as "mixed"; with no shared block it is "mixed".
    * "shared-loop": "loop", but the shared blocks run for the first member only and the later members
      reuse their output (`_TrunkOnce`): activations of B rows at a time. With no shared block, "loop".

    In every mode the LAST block runs only at the position each row's reward is read from
    (`pooled_block`, decided once from the model's classes; None for other architectures, or set it
    to None for the full forward): the same rewards and gradients, about 1/6 of that block's work.
    """

    def __init__(self, model: Any, tokenizer: Any, info: dict[str, Any], max_length: int = 512) -> None:
        super().__init__()
        self.model = model  # a peft PeftModel holding adapters m0..m{N-1}
        self.tokenizer = tokenizer
        self.info = info  # what ensemble.json records
        self.names: list[str] = list(info["members"])
        self.max_length = context_length(model, max_length)
        # blocks below the first adapted one are the same for every member (lora.layers_to_transform)
        self.shared_layers = _first_adapted_layer(model)
        blocks = layer_list(model.get_base_model())
        # the last block computed at the pooled position only, unless it is part of the trunk
        self.pooled_block = (pooled_block.for_model(model)
                             if blocks is not None and self.shared_layers < len(blocks) else None)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        base: str,
        n_members: int = 5,
        lora: models.LoraSpec | None = None,
        seeds: Sequence[int] | None = None,
        dtype: str = "auto",
        device: str = "auto",
        trust_remote_code: bool = False,
        max_length: int = 512,
        layers_to_transform: int | Sequence[int] | None = None,
        load_in_4bit: bool = False,
    ) -> RewardEnsemble:
        """A fresh ensemble of `n_members` LoRA members on `base` (member n seeded with seeds[n], default n).

        `layers_to_transform` (peft's option; negative = from the top) puts the members' LoRA on those
        blocks only: the blocks below the lowest one are then a trunk the members share, which the
        "shared" forward runs once per batch. `load_in_4bit`: QLoRA members on a 4-bit NF4 base
        (`models.plan_loading`); the saved ensemble loads on the full-precision base (`load`)."""
        from peft import get_peft_model

        if n_members < 2:
            raise UserError(
                f"a reward ensemble needs n_members >= 2, got {n_members} (use `alignkit rm` for one model)"
            )
        seeds = list(range(n_members)) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != n_members:
            raise UserError(f"ensemble seeds: got {len(seeds)} seeds for {n_members} members")
        lora = lora or models.LoraSpec()
        model, tokenizer = models.load_sequence_classifier(
            base, num_labels=1, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
            load_in_4bit=load_in_4bit,
        )
        if load_in_4bit:
            model = models.prepare_4bit(model)  # fp32 norms and head, input grads (as the single-model path)
        model.requires_grad_(False)  # the base stays frozen; only LoRA weights and member heads train
        names = [f"m{n}" for n in range(n_members)]
        config = lora.to_peft("SEQ_CLS")
        blocks = layer_list(model)
        layers = resolve_layers(layers_to_transform, len(blocks) if blocks is not None else 0)
        if layers is not None:
            if blocks is None:
                raise UserError(f"lora.layers_to_transform: cannot find the layer list of '{base}'; leave it out")
            config.layers_to_transform = layers
        for name, seed in zip(names, seeds):
            with torch.random.fork_rng(devices=[]):  # LoRA A is initialised on CPU, then moved
                torch.manual_seed(seed)
                try:
                    if name == names[0]:
                        model = get_peft_model(model, config, adapter_name=name)
                    else:
                        model.add_adapter(name, config)
                except ValueError as err:
                    raise UserError(f"lora.target_modules {lora.target_modules!r}: {str(err).splitlines()[0]}") from err
        info = {
            "format": "alignkit-reward-ensemble/1",
            "base": base,
            "base_path": models.resolve(base),
            "n_members": n_members,
            "members": names,
            "seeds": seeds,
            "lora": {**asdict(lora), "layers_to_transform": layers},
            "dropout": "disabled (eval mode in every forward, as TRL's disable_dropout)",
            "max_length": max_length,
            "trained_on_4bit": load_in_4bit,
            "metadata": {},
        }
        ensemble = cls(model, tokenizer, info, max_length)
        ensemble.set_trainable(True)
        return ensemble

    def member_parameters(self) -> list[torch.nn.Parameter]:
        """Every member's LoRA weights and head copy (the ensemble's trainable parameters)."""
        keys = [f".{n}." for n in self.names]
        return [
            p
            for name, p in self.model.named_parameters()
            if ("lora_" in name or "modules_to_save" in name) and any(k in name for k in keys)
        ]

    def set_trainable(self, flag: bool = True) -> None:
        for p in self.member_parameters():
            p.requires_grad_(flag)

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mode: Mode = "mixed") -> torch.Tensor:
        n, b = len(self.names), input_ids.shape[0]
        was_training = self.model.training
        self.model.eval()  # dropout off in both modes; peft requires eval mode for adapter_names
        try:
            if mode in ("mixed", "shared"):
                names = [name for name in self.names for _ in range(b)]
                inputs = {"input_ids": input_ids.repeat(n, 1), "attention_mask": attention_mask.repeat(n, 1)}
                with self.trunk(b) if mode == "shared" else contextlib.nullcontext(), self.pooled(**inputs):
                    # no KV cache: nothing reads one, and the pooled last block computes no full cache
                    return self.model(**inputs, adapter_names=names, use_cache=False).logits.view(n, b)
            if mode in ("loop", "shared-loop"):
                params = self.member_parameters()
                flags = [p.requires_grad for p in params]
                rows = []
                once = (_TrunkOnce(layer_list(self.model.get_base_model()), self.shared_layers)
                        if mode == "shared-loop" and self.shared_layers > 0 else None)
                try:
                    with once or contextlib.nullcontext(), self.pooled(input_ids, attention_mask):
                        for i, name in enumerate(self.names):
                            if once is not None and i == 1:
                                once.replay()
                            self.model.set_adapter(name)
                            _set_requires_grad_from(params, flags)  # set_adapter froze the other members
                            rows.append(
                                self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                                .logits.view(b)
                            )
                finally:
                    self.model.set_adapter(self.names[0])
                    _set_requires_grad_from(params, flags)
                return torch.stack(rows)
            raise ValueError(f"mode must be 'mixed', 'loop', 'shared' or 'shared-loop', got {mode!r}")
        finally:
            self.model.train(was_training)

    def trunk(self, b: int) -> contextlib.AbstractContextManager:
        """Around a mixed-batch forward of B rows × N members: run the shared blocks once (a no-op
        when every block is adapted)."""
        if self.shared_layers == 0:
            return contextlib.nullcontext()
        return _SharedTrunk(layer_list(self.model.get_base_model()), self.shared_layers, len(self.names), b)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> contextlib.AbstractContextManager:
        """Around one model call on these rows (N·B for a mixed batch): the last block at the pooled
        position only (a no-op when `pooled_block` is None)."""
        if self.pooled_block is None:
            return contextlib.nullcontext()
        return self.pooled_block.active(input_ids, attention_mask)

    @torch.no_grad()
    def score(
        self, prompts: Sequence, completions: Sequence, mode: Mode = "mixed", batch_size: int = 32
    ) -> torch.Tensor:
        """(N, B) member rewards of (prompt, completion) pairs, batched, no gradients, float32 on CPU."""
        texts = reward_texts(self.tokenizer, prompts, completions)
        out = [
            self(**self.encode(texts[i : i + batch_size]), mode=mode).float().cpu()
            for i in range(0, len(texts), batch_size)
        ]
        return torch.cat(out, dim=1) if out else torch.empty(len(self.names), 0)

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return encode(self.tokenizer, texts, self.max_length, _device_of(self.model))

    # -- introspection ------------------------------------------------------------------------------
    def lora_A_by_module(self) -> list[list[torch.Tensor]]:
        """For each LoRA-adapted module m, [A_1^(m), …, A_N^(m)] (each r × d_in), the live parameters
        (for the NNM diversity loss, UP-RLHF eq. 12)."""
        from peft.tuners.lora import LoraLayer

        out = []
        for module in self.model.modules():
            if isinstance(module, LoraLayer) and all(n in module.lora_A for n in self.names):
                out.append([module.lora_A[n].weight for n in self.names])
        return out

    def trainable_parameters(self) -> tuple[int, int]:
        return models.trainable_parameters(self.model)

    # -- disk ---------------------------------------------------------------------------------------
    def save(self, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """`dir/members/m{n}/` (standard peft adapters), `dir/ensemble.json` and the tokenizer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # peft writes every adapter not called "default" to <dir>/<adapter name>/
        self.model.save_pretrained(directory / "members", selected_adapters=self.names, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        self.info = {**self.info, "metadata": {**self.info.get("metadata", {}), **(metadata or {})}}
        (directory / "ensemble.json").write_text(json.dumps(self.info, indent=2, default=str))
        return directory

    @classmethod
    def load(
        cls,
        directory: str | Path,
        dtype: str = "auto",
        device: str = "auto",
        base: str | None = None,
        trust_remote_code: bool = False,
        max_length: int | None = None,
    ) -> RewardEnsemble:
        """Rebuild a saved ensemble on its base (or on `base`, which must be the same model)."""
        from peft import PeftModel

        directory = Path(directory)
        meta_file = directory / "ensemble.json"
        if not meta_file.is_file():
            raise UserError(f"'{directory}' is not a reward ensemble: it has no ensemble.json")
        info = json.loads(meta_file.read_text())
        if base is None:  # the name as given ("tiny") first: it re-resolves on another machine / cache
            base = info["base"]
            if not Path(models.resolve(base)).exists() and Path(info["base_path"]).is_dir():
                base = info["base_path"]
        same_name = base in (info["base"], info["base_path"])
        accepted = {base, models.resolve(base)} | ({info["base"], info["base_path"]} if same_name else set())
        accepted |= {str(Path(a).expanduser().resolve()) for a in list(accepted) if Path(a).expanduser().exists()}
        for name in info["members"]:
            member = directory / "members" / name
            cfg = member / "adapter_config.json"
            if not cfg.is_file() or not (member / "adapter_model.safetensors").is_file():
                raise UserError(
                    f"ensemble member '{member}' is missing adapter_config.json / adapter_model.safetensors"
                )
            trained_on = json.loads(cfg.read_text()).get("base_model_name_or_path")
            if trained_on and trained_on not in accepted and str(Path(trained_on).resolve()) not in accepted:
                raise UserError(f"ensemble member '{member}' was trained on base '{trained_on}', not on '{base}'")

        model, _ = models.load_sequence_classifier(
            base, num_labels=1, dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
        tokenizer = models.load_tokenizer(str(directory), trust_remote_code=trust_remote_code)
        model.requires_grad_(False)
        for i, name in enumerate(info["members"]):
            member = directory / "members" / name
            try:
                if i == 0:
                    model = PeftModel.from_pretrained(model, member, adapter_name=name, is_trainable=True)
                else:
                    model.load_adapter(member, adapter_name=name, is_trainable=True)
            except (RuntimeError, ValueError, KeyError) as err:
                raise UserError(
                    f"ensemble member '{member}' does not fit base '{base}': {str(err).strip().splitlines()[0][:200]}"
                ) from err
        model.to(models.choose_device(device))
        ensemble = cls(model, tokenizer, info, max_length or info.get("max_length", 512))
        ensemble.set_trainable(True)
        return ensemble


# --------------------------------------------------------------------------- scorers


class RewardModelScorer:
    """One sequence-classification reward model (num_labels = 1): members (1, B), uncertainty 0."""

    def __init__(
        self, model: Any, tokenizer: Any, batch_size: int = 32, max_length: int = 512, name: str | None = None
    ) -> None:
        if getattr(model.config, "num_labels", 1) != 1:
            raise UserError(f"a reward model has one output (num_labels=1), this one has {model.config.num_labels}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = context_length(model, max_length)
        self.name = name or getattr(model.config, "_name_or_path", "") or "reward model"

    @classmethod
    def from_dir(
        cls, path: str | Path, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False, **kw: Any
    ) -> RewardModelScorer:
        """A saved reward model: a model directory (config.json + safetensors), an `alignkit rm` run
        directory (its `model/`), or a peft SEQ_CLS adapter directory (merged into its base)."""
        path = Path(path)
        if (path / "summary.json").is_file() and (path / "model").is_dir():
            path = path / "model"
        if (path / REWARD_CONFIG).is_file():  # score with the length it was trained with
            kw.setdefault("max_length", json.loads((path / REWARD_CONFIG).read_text())["max_length"])
        adapter_cfg = path / "adapter_config.json"
        if not adapter_cfg.is_file():
            model, tok = models.load_sequence_classifier(
                str(path), num_labels=1, dtype=dtype, device=device, trust_remote_code=trust_remote_code
            )
            return cls(model, tok, **kw)
        from peft import PeftModel

        task = json.loads(adapter_cfg.read_text()).get("task_type")
        if task != "SEQ_CLS":
            raise UserError(f"adapter '{path}' has task_type {task!r}: a reward model adapter must be SEQ_CLS")
        base = models._adapter_base(str(path))
        model, tok = models.load_sequence_classifier(
            base, num_labels=1, dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
        if (path / "tokenizer_config.json").is_file():  # the tokenizer saved with the adapter wins
            tok = models.load_tokenizer(str(path), trust_remote_code=trust_remote_code)
        try:
            model = PeftModel.from_pretrained(model, path).merge_and_unload()
        except (RuntimeError, ValueError, KeyError) as err:
            raise UserError(
                f"adapter '{path}' does not fit base '{base}': {str(err).strip().splitlines()[0][:200]}"
            ) from err
        return cls(model, tok, **kw)

    @torch.no_grad()
    def score(self, prompts: list, completions: list, finished: list[bool] | None = None) -> Scores:
        del finished  # a learned reward model sees only the text
        texts = reward_texts(self.tokenizer, prompts, completions)
        device = _device_of(self.model)
        out = [
            self.model(**encode(self.tokenizer, texts[i : i + self.batch_size], self.max_length, device))
            .logits.view(-1)
            .float()
            .cpu()
            for i in range(0, len(texts), self.batch_size)
        ]
        members = (torch.cat(out) if out else torch.empty(0)).unsqueeze(0)
        return checked_scores(members, len(completions), f"reward model '{self.name}'")


class EnsembleScorer:
    """A `RewardEnsemble` as a Scorer. mode "auto" times the modes on the first batch (after one
    warm-up forward) and keeps the fastest for the rest of the scorer's life (`timings`, `mode`):
    loop and mixed, and "shared" / "shared-loop" when the members leave a trunk of blocks unadapted
    (`lora.layers_to_transform`; docs/algorithms/rm-ensemble.md)."""

    MODES = ("auto", "mixed", "loop", "shared", "shared-loop")

    def __init__(self, ensemble: RewardEnsemble, mode: str = "auto", batch_size: int = 32):
        if mode not in self.MODES:
            raise UserError(f"ensemble scoring mode '{mode}' is unknown: use {', '.join(self.MODES)}")
        self.ensemble = ensemble
        self.mode = mode
        self.batch_size = batch_size
        self.timings: dict[str, float] = {}  # seconds for the first batch, per mode ("auto" only)

    @torch.no_grad()
    def _choose(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rewards = self.ensemble(**batch, mode="mixed")  # warm-up (first-call allocations), result kept
        cuda = batch["input_ids"].is_cuda
        shared = ("shared", "shared-loop") if self.ensemble.shared_layers > 0 else ()
        modes = ("loop", "mixed", *shared)
        for mode in modes:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            self.ensemble(**batch, mode=mode)
            if cuda:
                torch.cuda.synchronize()
            self.timings[mode] = time.perf_counter() - start
        self.mode = min(self.timings, key=self.timings.get)
        return rewards

    @torch.no_grad()
    def score(self, prompts: list, completions: list, finished: list[bool] | None = None) -> Scores:
        del finished
        texts = reward_texts(self.ensemble.tokenizer, prompts, completions)
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.ensemble.encode(texts[i : i + self.batch_size])
            rewards = self._choose(batch) if self.mode == "auto" else self.ensemble(**batch, mode=self.mode)
            out.append(rewards.float().cpu())
        members = torch.cat(out, dim=1) if out else torch.empty(len(self.ensemble.names), 0)
        source = f"reward ensemble on '{self.ensemble.info.get('base')}'"
        return checked_scores(members - self.offsets()[:, None], len(completions), source)

    def offsets(self) -> torch.Tensor:
        """(N,) per-member reward offsets removed before mean and std (zeros if none were saved).

        Bradley–Terry is shift-invariant, so each member's reward carries an arbitrary constant;
        left in, the spread of those constants dominates the std over members (eq. 13) and hides
        the disagreement the uncertainty is meant to measure. `alignkit rm-ensemble` records each
        member's mean reward on its training completions as `member_offsets` in ensemble.json.
        """
        saved = self.ensemble.info.get("member_offsets")
        if saved is None:
            return torch.zeros(len(self.ensemble.names))
        return torch.tensor(saved, dtype=torch.float32)
