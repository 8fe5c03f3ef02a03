"""Uploading a finished run to the Hugging Face Hub (`--push-to-hub REPO`, `alignkit push RUN REPO`).

The whole run directory is uploaded (the weights under model/, summary.json, config.yaml, metrics,
plots), with a model card as its README.md: the base model, the datasets, the method and its
hyperparameters, and the run's results. Nothing is uploaded unless asked. docs/cli.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from alignkit.errors import UserError

# config blocks that hold a method's own hyperparameters (besides train: and model.lora)
METHOD_BLOCKS = ("pref", "kto", "ensemble", "ppo", "sppo", "eval")
NOT_UPLOADED = ["README.md", "*.lock", "checkpoints/*", "tensorboard/*"]  # README.md: the card replaces it


def check_can_push(repo: str, what: str | None = None) -> None:
    """Before training (or `alignkit push`): the cheap reasons a push would fail: a bad repo id, offline,
    no token. `what` names the request in the error (default: `--push-to-hub REPO`)."""
    what = what or f"--push-to-hub {repo}"
    later = ", or drop --push-to-hub and push the finished run later with `alignkit push RUN_DIR REPO`"
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise UserError(f"{what}: a repo id is user/name or org/name")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"{what}: HF_HUB_OFFLINE is set: unset it to push"
                        + (later if what.startswith("--") else ""))
    from huggingface_hub import get_token

    if not get_token():
        raise UserError(f"{what}: no hub token: run `hf auth login` or set HF_TOKEN")


def _read_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, summary) of a finished run; one line when it is not one."""
    cfg_file, summary_file = run_dir / "config.yaml", run_dir / "summary.json"
    if not summary_file.is_file() or not cfg_file.is_file():
        raise UserError(f"{run_dir}: not a finished alignkit run (no summary.json/config.yaml): nothing to push")
    return yaml.safe_load(cfg_file.read_text()) or {}, json.loads(summary_file.read_text())


def _results(summary: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """The numbers of summary.json (nested blocks flattened to a.b), for the card's results table."""
    rows: list[tuple[str, Any]] = []
    for key, value in summary.items():
        if isinstance(value, dict):
            rows += _results(value, f"{prefix}{key}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            rows.append((f"{prefix}{key}", round(value, 6) if isinstance(value, float) else value))
    return rows


def model_card(run_dir: str | Path) -> str:
    """README.md for the hub: YAML front matter (base_model, datasets, tags) and the run's facts."""
    run_dir = Path(run_dir)
    cfg, summary = _read_run(run_dir)
    command = cfg.get("command", "?")
    model = cfg.get("model") or {}
    base = model.get("name", "?")
    data = cfg.get("data") or {}
    datasets = [s for s in [data.get("source"), (cfg.get("eval") or {}).get("ood_source")] if s]
    lora = model.get("lora") or {}
    front: dict[str, Any] = {"library_name": "peft" if lora.get("enabled") else "transformers",
                             "tags": ["alignkit", command]}
    if "/" in base and not Path(base).exists():  # a hub id (not an alias or a local directory)
        front["base_model"] = base
    hub_data = [s for s in datasets if "/" in s and not s.startswith("builtin:") and not Path(s).exists()]
    if hub_data:
        front["datasets"] = hub_data
    hyper = {"train": cfg.get("train") or {}, **({"lora": lora} if lora.get("enabled") else {}),
             **{b: cfg[b] for b in METHOD_BLOCKS if cfg.get(b)}, **({"trainer": cfg["trainer"]} if cfg.get("trainer")
                                                                  else {})}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {run_dir.name}", "",
             f"Trained with alignkit: `alignkit {command}`.", "",
             f"- **Base model**: `{base}`",
             f"- **Datasets**: {', '.join(f'`{s}`' for s in datasets) or 'none'}",
             f"- **Method**: `{command}`" + (f" (loss `{cfg[b]['loss']}`)" if (b := next(
                 (b for b in METHOD_BLOCKS if isinstance(cfg.get(b), dict) and cfg[b].get("loss")), None)) else ""),
             ""]
    if (run_dir / "model").is_dir():
        lines += ["The weights are in `model/`: `AutoModelForCausalLM.from_pretrained(REPO, subfolder=\"model\")`"
                  + (" (a peft adapter on the base model)" if lora.get("enabled") else "") + ".", ""]
    lines += ["## Hyperparameters", "", "```yaml", yaml.safe_dump(hyper, sort_keys=False).strip(), "```", "",
              "## Results (summary.json)", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _results(summary)]
    lines += ["", "The full configuration is config.yaml; the training curves are metrics.jsonl and plots/.", ""]
    return "\n".join(lines)


def push(run_dir: str | Path, repo: str, private: bool = False) -> str:
    """Create `repo` (if needed) and upload the run directory with its model card. Returns the repo URL.
    A hub failure is one line that says how to try again; the run itself is left as it is."""
    from huggingface_hub import HfApi

    run_dir = Path(run_dir)
    card = model_card(run_dir)
    api = HfApi()
    try:
        url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo, repo_type="model", folder_path=str(run_dir), ignore_patterns=NOT_UPLOADED,
                          commit_message=f"alignkit run {run_dir.name}")
        api.upload_file(repo_id=repo, repo_type="model", path_or_fileobj=card.encode(), path_in_repo="README.md",
                        commit_message="model card")
    except Exception as exc:  # network, auth, permissions: the finished run must stay as it is
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"push to {repo} failed ({reason}); the run is kept at {run_dir}: push it later with "
                        f"`alignkit push {run_dir} {repo}`") from None
    return str(url)
