"""Small test utilities shared by the trainer tests (imported as `from helpers import ...`)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from transformers import TrainerCallback


class Interrupt(TrainerCallback):
    """Raises KeyboardInterrupt (what Ctrl-C does) at the end of optimiser step `at`."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt


def run_cli(argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """Run `alignkit ARGV` in-process through the console entry point: (exit code, stdout, stderr)."""
    from alignkit import cli

    monkeypatch.setattr(sys, "argv", ["alignkit", *argv])
    cli._state["debug"] = False
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *words: str) -> str:
    """The error contract: exit 2, one `error:` line naming `words`, no traceback."""
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def assert_python_runs(code: str) -> None:
    """Run `code` in a fresh interpreter (nothing imported yet) and fail with its stderr if it fails:
    for the import-layering checks (what a module pulls in at import time)."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def copy_without_chat_template(model_dir: Path, out: Path) -> Path:
    """A copy of a model directory whose tokenizer has no chat template (as base models like gpt2 or opt)."""
    shutil.copytree(model_dir, out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    (out / "chat_template.jinja").unlink(missing_ok=True)
    return out
