"""The fake's `vllm.distributed`: the cleanup a one-process command calls when it closes an engine."""

from vllm import CALLS


def cleanup_dist_env_and_memory(shutdown_ray: bool = False) -> None:
    CALLS["cleanup"].append(True)
