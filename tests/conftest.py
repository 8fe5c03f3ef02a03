"""Shared fixtures: offline, isolated cache, the tiny model built once per session."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

# Set before transformers / huggingface_hub are imported by any test module.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# `make test` runs two pytest workers on two cores (pytest-xdist): one math thread each, or the two
# workers' torch thread pools fight over the cores (and so do the CLI subprocesses they start)
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def alignkit_cache(tmp_path_factory: pytest.TempPathFactory):
    """Point ALIGNKIT_CACHE at a session temp dir so tests never touch ~/.cache."""
    path = tmp_path_factory.mktemp("alignkit-cache")
    old = os.environ.get("ALIGNKIT_CACHE")
    os.environ["ALIGNKIT_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("ALIGNKIT_CACHE", None)
    else:
        os.environ["ALIGNKIT_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(alignkit_cache):
    """The built-in tiny Llama, built once into the session cache (also what `resolve("tiny")` returns)."""
    from alignkit.models import build_tiny

    return build_tiny(alignkit_cache)


@pytest.fixture(scope="session")
def sft_tiny_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model after a short SFT on the built-in task: the backbone reward models start from
    (the RM is the SFT model with a scalar head, docs/algorithms/rm-ensemble.md). Built once for the
    whole test run: under pytest-xdist the first worker trains it and the others wait and read it."""
    from filelock import FileLock

    from alignkit.trainers import sft

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if "PYTEST_XDIST_WORKER" in os.environ else base  # xdist: the workers' common dir
    out = shared / "sft-base" / "run"
    with FileLock(str(shared / "sft-base.lock")):
        if not (out / "summary.json").is_file():  # a finished run (renamed into place at the end)
            sft.run(sft.SFTConfig(
                model={"name": "tiny", "device": "cpu"}, data={"source": "builtin:sft", "max_samples": 1024},
                train={"learning_rate": 3e-3, "epochs": 2, "batch_size": 32, "max_length": 96,
                       "logging_steps": 10},
                output={"dir": str(out), "overwrite": True},
            ))
    return out / "model"


FAKE_VLLM = Path(__file__).parent / "fake_vllm"


@pytest.fixture
def fake_vllm(monkeypatch):
    """The fake `vllm` importable, CUDA reported visible (the fake runs on CPU); its call log, emptied."""
    from alignkit import vllm_backend

    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(FAKE_VLLM))
    monkeypatch.setattr(vllm_backend, "_cuda_available", lambda: True)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # the engine sets them (external_launcher): restored after
    vllm = importlib.import_module("vllm")
    assert vllm.__file__.startswith(str(FAKE_VLLM))
    vllm.reset_calls()
    before = {key: os.environ.get(key) for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    yield vllm
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        sys.modules.pop(name, None)
    for key, value in before.items():  # what an engine set for itself must not leak into the next test
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
