"""Q-probe's code reward: MBPP-style unit tests run on model-written programs in the sandbox.

The reward of Q-probe's code experiments (arXiv 2402.14688, MBPP): program = completion cut at a stop
sequence + "\\n" + the task's `assert` lines; 1 if it runs without error within 3 s, else 0.
`build_program` / `cut_at_stop` assemble programs, `CodeScorer` is the reward behind the `Scorer`
protocol (`--reward mbpp:SOURCE`); `alignkit.sandbox` runs the programs. The stop-sequence rules and
the end-of-tests marker: docs/sandbox.md.
"""

from __future__ import annotations

import io
import secrets
import tokenize
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from alignkit.errors import UserError
from alignkit.sandbox import Result, Sandbox

if TYPE_CHECKING:  # importing scoring pulls in torch; score() imports it when called
    from alignkit.scoring import Scores

# Q-probe reference stop words: the completion is a function body that follows the prompt.
BODY_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\nassert", '\n"""')
# The completion is a whole program (alignkit's MBPP rows): stop at test scaffolding, not at "def".
PROGRAM_STOP = ("\nassert", "\nprint", "\nif __name__", "\n```", "[DONE]")
DEFAULT_STOP = BODY_STOP


# --------------------------------------------------------------------------- building programs


def build_program(
    prompt: str,
    completion: str,
    tests: Sequence[str],
    stop: Sequence[str] = DEFAULT_STOP,
    *,
    include_prompt: bool = True,
    setup: str = "",
    sentinel: str | None = None,
) -> str:
    """prompt + completion cut at the first stop + "\\n" + setup + the assert lines (+ a line that
    writes `sentinel` to stdout once every assert has passed)."""
    prefix = prompt if include_prompt else ""
    body = prefix + cut_at_stop(completion, stop, prefix)
    parts = [body, setup, *tests]
    if sentinel is not None:
        parts.append(f"__import__('os').write(1, {(sentinel + chr(10)).encode()!r})")
    return "\n".join(p for p in parts if p) + "\n"


def cut_at_stop(completion: str, stop: Sequence[str], prefix: str = "") -> str:
    """`completion` up to its first stop sequence; "\\n…" stops count only where they start a new
    top-level statement of `prefix + completion` (docs/sandbox.md, "Stop sequences")."""
    cut = len(completion)
    line_stops: list[int] = []  # completion offsets of "\n" that begin a matched line stop
    for s in stop:
        if not s:
            continue
        if not s.startswith("\n"):
            i = completion.find(s)
            cut = min(cut, i) if i >= 0 else cut
            continue
        i = completion.find(s)
        while 0 <= i < cut:
            line_stops.append(i)
            i = completion.find(s, i + 1)
    candidates = sorted(i for i in set(line_stops) if i < cut)
    if candidates:
        starts, fail = _statement_starts(prefix + completion)
        base = len(prefix) + 1  # offset of the character after the "\n"
        for i in candidates:
            if base + i >= fail or base + i in starts:
                return completion[:i]
    return completion[:cut]


_SKIP = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)


def _statement_starts(text: str) -> tuple[set[int], int]:
    """(line-start offsets where a new top-level statement or a column-0 comment followed by one
    begins, offset from which the text could not be tokenised)."""
    line_start = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"]
    starts: set[int] = set()
    pending: list[int] = []  # column-0 comments waiting for the next code token
    depth, prev, fail = 0, None, len(text) + 1
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            off = line_start[tok.start[0] - 1] + tok.start[1] if tok.start[0] <= len(line_start) else len(text)
            if tok.type in (tokenize.INDENT, tokenize.DEDENT):
                continue
            new_line = tok.start[1] == 0 and depth == 0 and prev in (None, tokenize.NEWLINE, tokenize.NL)
            if tok.type == tokenize.COMMENT:
                if new_line:
                    pending.append(off)
            elif tok.type not in _SKIP:  # code (or ENDMARKER): decides the pending comments
                if tok.start[1] == 0 or tok.type == tokenize.ENDMARKER:
                    starts.update(pending)
                    if new_line:
                        starts.add(off)
                pending = []
            if tok.type == tokenize.OP and tok.string in ("(", "[", "{"):
                depth += 1
            elif tok.type == tokenize.OP and tok.string in (")", "]", "}"):
                depth = max(0, depth - 1)
            prev = tok.type
    except tokenize.TokenError as err:
        row, col = err.args[1] if len(err.args) > 1 else (len(line_start), 0)
        fail = line_start[min(row, len(line_start)) - 1] + col
        starts.update(pending)
    except (IndentationError, SyntaxError) as err:
        fail = line_start[min(err.lineno or len(line_start), len(line_start)) - 1]
        starts.update(pending)
    return starts, fail


# --------------------------------------------------------------------------- the scorer


@dataclass(frozen=True)
class Task:
    tests: tuple[str, ...]
    setup: str = ""


class CodeScorer:
    """Q-probe's code reward behind the `Scorer` protocol: 1.0 when `build_program(prompt,
    completion, tests)` passes in the sandbox, else 0.0 (docs/sandbox.md)."""

    def __init__(
        self,
        tasks: Mapping[str, Sequence[str]] | Iterable[Mapping[str, Any]],
        *,
        include_prompt: bool = True,
        stop: Sequence[str] | None = None,
        sandbox: Sandbox | None = None,
    ) -> None:
        self.tasks = _tasks(tasks)
        if not self.tasks:
            raise UserError("CodeScorer: no tasks given (expected prompt -> assert lines)")
        self.include_prompt = include_prompt
        self.stop = tuple(stop) if stop is not None else BODY_STOP if include_prompt else PROGRAM_STOP
        self.sandbox = sandbox or Sandbox()
        self.sandbox.check()  # refuse now, not with a batch of zeros later
        self.last_results: list[Result] = []

    @classmethod
    def from_source(cls, source: str, split: str = "train", **kwargs: Any) -> CodeScorer:
        """MBPP-style rows (prompt + test_list [+ test_setup_code]) from any `alignkit.data.load` source.
        alignkit's MBPP prompt is prose, so the program is the completion alone by default."""
        from alignkit import data

        ds, _ = data.load(source, split=split)
        if "test_list" not in ds.column_names or "prompt" not in ds.column_names:
            raise UserError(f"'{source}': CodeScorer needs MBPP-style rows with 'prompt' and 'test_list' "
                            f"columns (found: {', '.join(ds.column_names)})")
        kwargs.setdefault("include_prompt", False)
        return cls(ds, **kwargs)

    def programs(self, prompts: Sequence, completions: Sequence, markers: Sequence[str] | None = None) -> list[str]:
        """The programs `score` runs (with `markers`, each ends by printing its marker)."""
        if len(prompts) != len(completions):
            raise UserError(f"CodeScorer: {len(prompts)} prompts but {len(completions)} completions")
        out = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            task = self.tasks.get(prompt) if isinstance(prompt, str) else None
            if task is None:
                raise UserError(f"CodeScorer: no tests for prompt {str(prompt)[:80]!r}… "
                                f"({len(self.tasks)} prompts known); score prompts from the scorer's own dataset")
            out.append(build_program(prompt, completion, task.tests, self.stop,
                                     include_prompt=self.include_prompt, setup=task.setup,
                                     sentinel=markers[i] if markers else None))
        return out

    def score(self, prompts: list, completions: list, finished: list[bool] | None = None) -> Scores:
        """`finished` is ignored: a truncated completion is run as it is (it usually fails to parse)."""
        import torch

        from alignkit.scoring import checked_scores

        markers = [f"alignkit-tests-passed-{secrets.token_hex(12)}" for _ in prompts]
        programs = self.programs(prompts, completions, markers)
        self.last_results = self.sandbox.run_many(programs, markers)
        again = [i for i, r in enumerate(self.last_results) if r.status == "error"]
        if again:  # the SANDBOX failed (not the program), e.g. a transient fork failure: try those once more
            for i, r in zip(again, self.sandbox.run_many([programs[i] for i in again], [markers[i] for i in again]),
                            strict=True):
                self.last_results[i] = r
        broken = [r for r in self.last_results if r.status == "error"]
        if broken:  # still failing: a 0 here would silently corrupt the labels
            raise UserError(f"CodeScorer: the sandbox could not run {len(broken)} of {len(programs)} programs: "
                            f"{broken[0].stderr.strip().splitlines()[-1] if broken[0].stderr.strip() else 'no reason'}")
        passed = [float(r.passed) for r in self.last_results]
        return checked_scores(torch.tensor([passed], dtype=torch.float32), len(completions), "CodeScorer")


def _tasks(tasks: Mapping[str, Sequence[str]] | Iterable[Mapping[str, Any]]) -> dict[str, Task]:
    """prompt -> Task, from a mapping prompt -> assert lines or from rows (prompt, test_list, ...)."""
    out: dict[str, Task] = {}
    if isinstance(tasks, Mapping):
        for prompt, tests in tasks.items():
            lines = tuple(t for t in (tests.splitlines() if isinstance(tests, str) else tests) if t.strip())
            if not isinstance(prompt, str) or not lines:  # no assert at all would pass every program
                raise UserError(f"CodeScorer: prompt {str(prompt)[:60]!r} needs a text prompt and assert lines")
            out[prompt] = Task(lines)
        return out
    for i, row in enumerate(tasks, start=1):
        prompt, tests = row.get("prompt"), row.get("test_list")
        if not isinstance(prompt, str) or not isinstance(tests, list | tuple) or not tests:
            raise UserError(f"CodeScorer: row {i}: needs a text 'prompt' and a non-empty 'test_list'")
        task = Task(tuple(tests), row.get("test_setup_code") or "")
        if out.get(prompt, task) != task:
            raise UserError(f"CodeScorer: row {i}: the same prompt appears with different tests")
        out[prompt] = task
    return out


__all__ = ["BODY_STOP", "DEFAULT_STOP", "PROGRAM_STOP", "CodeScorer", "Task", "build_program", "cut_at_stop"]
