"""Data parallelism for the explicit loops (PPO, SPPO): start the ranks, shard, gather, average.

Each rank runs the whole loop on its own shard of the prompts; these helpers are the few collectives the
loops need (gloo on CPU, nccl on GPU), and each is a no-op on one process. Gradients are averaged by
`average_gradients` after backward, not by DDP's wrapper: the policy and the critic may share a base and
switch adapters, which DDP's fixed parameter sets do not allow.
"""

from __future__ import annotations

from typing import Any

SHARDING = ("fsdp", "zero2", "zero3")  # launch.accelerate_config values the explicit loops shard with FSDP2


def check_launch(config: str | None, command: str, load_in_4bit: bool = False) -> None:
    """A config check (ValueError): the accelerate configs an explicit loop runs under."""
    if config not in (None, "ddp", *SHARDING):
        raise ValueError(f"launch.accelerate_config={config} is not supported by {command}: ddp, or "
                         f"{', '.join(SHARDING)} (FSDP2 sharding)")
    if config in SHARDING and load_in_4bit:
        raise ValueError(f"model.load_in_4bit cannot be sharded by {command}'s FSDP2 (4-bit weights): use "
                         "launch.accelerate_config ddp, or full-precision weights")


def sharding(config: str | None, world: int) -> str | None:
    """The FSDP2 sharding a loop applies: `config` when it is one of SHARDING and there are several ranks."""
    return config if world > 1 and config in SHARDING else None


def shard(model: Any, config: str | None) -> Any:
    """Shard `model`'s parameters over the ranks with torch's FSDP2 (`fully_shard`) when `config` is fsdp,
    zero3 (parameters, gradients and optimiser state sharded; parameters gathered per layer for each
    forward) or zero2 (the same, parameters kept gathered between forward and backward). Units: each
    decoder layer (the model's `_no_split_modules`), the decoder body (so that a critic calling the body
    alone gathers its embeddings), the whole model. A peft model is sharded through its base model. The
    explicit loops do not use DeepSpeed: zero2 / zero3 name the equivalent FSDP2 sharding."""
    if config not in SHARDING:
        return model
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        from alignkit.errors import UserError

        raise UserError(f"cannot shard {type(base).__name__}: it names no decoder layer class (_no_split_modules); "
                        "use launch.accelerate_config ddp")
    keep = config == "zero2"
    for layer in layers:
        fully_shard(layer, reshard_after_forward=not keep)
    body = getattr(base, "base_model", None)
    if body is not None and body is not base:
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        tied = head is not None and any(h is e for h in head.parameters() for e in body.parameters())
        # a tied LM head shares the embedding: one unit for both
        fully_shard([body, head] if tied else body, reshard_after_forward=not keep)
    fully_shard(base, reshard_after_forward=not keep)
    return model


def full_state_dict(model: Any) -> dict[str, Any]:
    """The whole, unsharded state dict of a sharded `model` on CPU (a collective: every rank calls it; rank
    0 gets the tensors, the others an empty dict), for `save_pretrained(state_dict=...)`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a tied weight (the LM head of a model that ties it to the embedding) once, as save_pretrained writes it
    own = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {name: t for name, t in full.items() if name in own}


def clip_grad_norm_(params: list[Any], max_norm: float) -> float:
    """`torch.nn.utils.clip_grad_norm_` for a mix of sharded (FSDP2 DTensor) and whole parameters (a sharded
    critic body and its plain value head): the global L2 norm of all gradients, every gradient scaled by
    min(1, max_norm / norm). Returns the norm before clipping."""
    import torch

    squares = 0.0
    grads = [q.grad for q in params if q.grad is not None]
    for g in grads:
        norm = torch.linalg.vector_norm(g.detach().float())
        squares += float(norm.full_tensor() if is_sharded(norm) else norm) ** 2
    total = squares**0.5
    scale = max_norm / (total + 1e-6)
    if scale < 1.0:
        for g in grads:
            g.mul_(scale)
    return total


def is_sharded(param: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


class gathered:  # noqa: N801 - used as a context manager, like torch.no_grad
    """`with gathered(model):` every FSDP2 unit of `model` holds its full parameters for the block and
    keeps them across forwards (generation calls the model once per token); resharded after. A no-op on
    a model that is not sharded."""

    def __init__(self, model: Any) -> None:
        from torch.distributed.fsdp import FSDPModule

        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)]

    def __enter__(self) -> None:
        for unit in self.units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()

    def __exit__(self, *exc: Any) -> None:
        for unit in self.units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def start_ranks(device: str) -> tuple[int, int, str]:
    """(rank, world size, device). In a launched rank (launch.num_processes > 1) start torch.distributed:
    gloo on CPU, nccl on GPU with each rank on its own GPU (cuda:LOCAL_RANK)."""
    import torch
    import torch.distributed as dist

    from alignkit.launch import rank_info
    from alignkit.models import choose_device

    info = rank_info()
    if info["world_size"] == 1:
        return 0, 1, device
    cuda = choose_device(device).type == "cuda"
    if cuda:
        device = f"cuda:{info['local_rank']}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def gather(x: Any, world: int) -> Any:
    """Every rank's (equal-sized) tensor `x`, concatenated in rank order (`x` itself on one process)."""
    if world == 1:
        return x
    import torch
    import torch.distributed as dist

    x = _for_collectives(x.contiguous())
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts).cpu()


def gather_objects(obj: Any, world: int) -> list[Any]:
    """Every rank's picklable `obj`, in rank order (`[obj]` on one process)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast(params: list[Any], world: int) -> None:
    """Copy rank 0's values of `params` to every rank (one collective per tensor, at start-up only)."""
    if world == 1:
        return
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for q in params:
            if is_sharded(q):  # sharded from identical weights on every rank
                continue
            buf = _for_collectives(q.data)
            dist.broadcast(buf, src=0)
            q.data.copy_(buf)


def average_gradients(params: list[Any], world: int) -> None:
    """Replace each gradient of `params` by its mean over the ranks, in one all-reduce of a flat buffer
    (what DDP does, without its wrapper: the policy and the critic may share a base and switch adapters,
    which DDP's fixed parameter sets do not allow). A parameter that has a gradient on some rank but not
    on this one (a rank with no rows in a small last batch) takes part with zeros; one that has none on
    any rank keeps None, as on one process."""
    if world == 1:
        return
    import torch
    import torch.distributed as dist

    params = [q for q in params if not is_sharded(q)]  # FSDP2 reduce-scatters and averages sharded ones itself
    if not params:
        return
    has = _for_collectives(torch.tensor([q.grad is not None for q in params], dtype=torch.int32))
    dist.all_reduce(has)
    live = [q for q, n in zip(params, has.tolist(), strict=True) if n > 0]
    for q in live:
        if q.grad is None:
            q.grad = torch.zeros_like(q)
    if not live:
        return
    flat = _for_collectives(torch.cat([q.grad.reshape(-1) for q in live]))
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for q in live:
        q.grad.copy_(flat[offset : offset + q.grad.numel()].view_as(q.grad))
        offset += q.grad.numel()


def mean_over_ranks(row: dict[str, float], world: int) -> dict[str, float]:
    """Each metric's mean over the ranks (every rank logs the same keys; equal shards, so a plain mean)."""
    if world == 1:
        return row
    import torch
    import torch.distributed as dist

    values = _for_collectives(torch.tensor([float(v) for v in row.values()], dtype=torch.float64))
    dist.all_reduce(values)
    return dict(zip(row, (values / world).tolist(), strict=True))


def _for_collectives(x: Any) -> Any:
    """`x` where the process group's backend can reach it: the rank's GPU under nccl, CPU under gloo."""
    import torch
    import torch.distributed as dist

    return x.to(torch.device("cuda", torch.cuda.current_device())) if dist.get_backend() == "nccl" else x


def shard_report(seen: set[tuple[int, int]], world: int) -> dict[str, Any] | None:
    """The data-parallel report (None on one process): prompts per rank, and how many (iteration, prompt)
    pairs more than one rank sampled (0: the shards are disjoint)."""
    if world == 1:
        return None
    import torch.distributed as dist

    per_rank: list[Any] = [None] * world
    dist.all_gather_object(per_rank, sorted(seen))
    sets = [set(map(tuple, s)) for s in per_rank]
    shared = sum(len(a & b) for i, a in enumerate(sets) for b in sets[i + 1 :])
    return {"world_size": world, "prompts_per_rank": [len(s) for s in sets], "prompts_sampled_by_two_ranks": shared}


__all__ = ["SHARDING", "average_gradients", "barrier", "broadcast", "check_launch", "clip_grad_norm_",
           "full_state_dict", "gather", "gather_objects", "gathered", "is_sharded", "mean_over_ranks", "shard",
           "shard_report", "sharding", "start_ranks"]
