"""A model directory that cannot load, and a cache path that is a file: one line naming what is wrong,
exit 2, no traceback, nothing written (issue 9, part B). The broken directories are copies of `tiny`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import run_cli

from alignkit.errors import UserError
from alignkit.models import load_causal_lm, load_sequence_classifier, load_tokenizer


def _edit_config(d: Path, **changes) -> None:
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, **changes}))


def _truncate(d: Path) -> None:
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # header intact, tensors cut off


def _garbage(d: Path) -> None:
    (d / "model.safetensors").write_bytes(b"this is not a safetensors file\n" * 8)


def _no_tokenizer(d: Path) -> None:
    for f in d.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            f.unlink()


BROKEN = {  # case -> (how to break a copy of tiny, what the one line says)
    "truncated-weights": (_truncate, "model.safetensors is not a complete safetensors file"),
    "garbage-weights": (_garbage, "model.safetensors is not a complete safetensors file"),
    "empty-weights": (lambda d: (d / "model.safetensors").write_bytes(b""), "is truncated or corrupt"),
    "unknown-model-type": (lambda d: _edit_config(d, model_type="no-such-arch"),
                           "config.json has model_type 'no-such-arch', which transformers"),
    "config-not-json": (lambda d: (d / "config.json").write_text("{not json"), "config.json is not valid JSON"),
    "shapes-differ": (lambda d: _edit_config(d, hidden_size=64),
                      "model.embed_tokens.weight is [768, 128] in the checkpoint but [768, 64] by the config"),
    "layer-missing": (lambda d: _edit_config(d, num_hidden_layers=3), "model.layers.2."),
    "no-tokenizer": (_no_tokenizer, "has no tokenizer"),
}


@pytest.fixture(scope="module")
def broken(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    dirs = {}
    for case, (breaker, _) in BROKEN.items():
        dirs[case] = shutil.copytree(tiny_model_dir, root / case)
        breaker(dirs[case])
    return dirs


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_model_directory_is_one_user_error_naming_it(case, broken) -> None:
    with pytest.raises(UserError) as err:
        load_causal_lm(str(broken[case]), device="cpu")
    message = str(err.value)
    assert "\n" not in message and f"'{broken[case]}'" in message and BROKEN[case][1] in message, message


@pytest.mark.parametrize("case", ["truncated-weights", "shapes-differ", "no-tokenizer"])
def test_the_cli_says_it_in_one_line_and_writes_nothing(case, broken, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "samples.jsonl"
    code, _, err = run_cli(["generate", "-m", str(broken[case]), "-p", "builtin:prompts", "--max-samples", "2",
                            "--out", str(out)], monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    assert str(broken[case]) in lines[0] and BROKEN[case][1] in lines[0]
    assert not out.exists()


def test_a_reward_model_may_lack_its_head_but_not_its_backbone(broken, tiny_model_dir) -> None:
    model, _ = load_sequence_classifier(str(tiny_model_dir), device="cpu")  # `score` is new: fine
    assert model.config.num_labels == 1
    with pytest.raises(UserError, match=r"model\.layers\.2\..* are missing from the checkpoint"):
        load_sequence_classifier(str(broken["layer-missing"]), device="cpu")


def test_the_tokenizer_alone_names_the_directory_too(broken) -> None:
    with pytest.raises(UserError, match="has no tokenizer"):
        load_tokenizer(str(broken["no-tokenizer"]))


@pytest.mark.parametrize("under", [False, True])
def test_a_cache_path_that_is_a_file_is_one_line(under, tmp_path, monkeypatch, capsys) -> None:
    afile = tmp_path / "not-a-dir"
    afile.write_text("x")
    cache = afile / "sub" if under else afile
    monkeypatch.setenv("ALIGNKIT_CACHE", str(cache))
    out = tmp_path / "samples.jsonl"
    code, _, err = run_cli(["generate", "-m", "tiny", "-p", "builtin:prompts", "--max-samples", "2",
                            "--out", str(out)], monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"alignkit cache '{cache}' (ALIGNKIT_CACHE)" in lines[0] and f"{afile} is a file" in lines[0]
    assert not out.exists() and afile.read_text() == "x"
