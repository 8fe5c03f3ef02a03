"""Data parallelism for the explicit loops (PPO, SPPO): start the ranks, shard, gather, average.

Each rank runs the whole loop on its own shard of the prompts; these helpers are the few collectives the
loops need (gloo on CPU, nccl on GPU), and each is a no-op on one process. Gradients are averaged by
`average_gradients` after backward, not by DDP's wrapper: the policy and the critic may share a base and
switch adapters, which DDP's fixed parameter sets do not allow.
"""

from __future__ import annotations

from typing import Any


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


__all__ = ["average_gradients", "barrier", "broadcast", "gather", "gather_objects", "mean_over_ranks",
           "shard_report", "start_ranks"]
