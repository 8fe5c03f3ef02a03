"""Real datasets at size (docs/data.md): a bad row stops the load with its row number, `--skip-invalid` drops
such rows with a count per reason (printed, and in summary.json's dropped_rows), and hub datasets are loaded by
the local main process first while the other ranks wait for its marker."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from helpers import one_line_error, run_cli

from alignkit import data
from alignkit.data import main_first, sources
from alignkit.errors import UserError

PAIRS = [{"prompt": f"question {i} :", "chosen": f" good answer {i}", "rejected": f" bad {i}"} for i in range(8)]


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _bad_pairs(tmp_path: Path) -> str:
    rows = [dict(r) for r in PAIRS]
    rows[2]["chosen"] = ""  # an empty reply (the full Anthropic/hh-rlhf has some)
    rows[4]["rejected"] = "   "
    rows[6]["chosen"] = None
    return _write(tmp_path / "pairs.jsonl", rows)


def test_a_bad_row_stops_the_load_with_its_row_number(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"pairs.jsonl: row 3: field 'chosen' is empty .*--skip-invalid"):
        data.load(_bad_pairs(tmp_path), kind="pairwise")


def test_skip_invalid_drops_and_counts_per_reason(tmp_path: Path, capsys) -> None:
    dropped: dict[str, int] = {}
    ds, _ = data.load(_bad_pairs(tmp_path), kind="pairwise", skip_invalid=True, dropped=dropped)
    assert list(ds["chosen"]) == [PAIRS[i]["chosen"] for i in (0, 1, 3, 5, 7)]
    assert dropped == {"empty_field": 2, "missing_field": 1}
    assert "dropped 3 of 8 rows (empty_field: 2" in capsys.readouterr().err
    # hh-rlhf's own form (no prompt column): the reply after the last "Assistant:" is empty
    hh = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: yes {i}", "rejected": f"\n\nHuman: q{i}\n\nAssistant: no"}
          for i in range(4)]
    hh[1]["chosen"] = "\n\nHuman: q1\n\nAssistant:"
    src = _write(tmp_path / "hh.jsonl", hh)
    with pytest.raises(UserError, match="row 2"):
        data.load(src, kind="pairwise")
    dropped = {}
    ds, _ = data.load(src, kind="pairwise", skip_invalid=True, dropped=dropped)
    assert len(ds) == 3 and sum(dropped.values()) == 1
    with pytest.raises(UserError, match="all 2 rows were dropped"):  # nothing left: still an error
        data.load(_write(tmp_path / "none.jsonl", [{"prompt": "p", "completion": ""}] * 2), skip_invalid=True)


def test_skip_invalid_counts_land_in_summary_json_of_a_dpo_run(tmp_path: Path, tiny_model_dir: Path, monkeypatch,
                                                               capsys) -> None:
    src, out = _bad_pairs(tmp_path), tmp_path / "run"
    argv = ["dpo", "--model", str(tiny_model_dir), "--data", src, "--device", "cpu", "--max-steps", "1",
            "--batch-size", "4", "--max-length", "32", "--output-dir", str(out)]
    code, _, err = run_cli(argv, monkeypatch, capsys)
    one_line_error(code, err, "row 3", "chosen")
    assert not out.exists()
    code, _, err = run_cli([*argv, "--skip-invalid"], monkeypatch, capsys)
    assert code == 0, err
    assert "dropped 3 of 8 rows" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dropped_rows"] == {"empty_field": 2, "missing_field": 1}


def test_rank_one_waits_for_the_main_process(tmp_path: Path) -> None:
    events: list[str] = []

    def rank(local_rank: int) -> None:
        with main_first.main_process_first("org/data/train", local_rank=local_rank, world_size=2,
                                           cache_dir=tmp_path, poll_s=0.01, timeout_s=10):
            events.append(f"load {local_rank}")

    other = threading.Thread(target=rank, args=(1,))
    other.start()
    time.sleep(0.3)  # rank 1 started first and is still waiting: nothing was loaded
    assert events == [] and other.is_alive()
    rank(0)
    other.join(10)
    assert events == ["load 0", "load 1"]
    assert main_first.marker_path("org/data/train", tmp_path).read_text() == "ok"


def test_a_failed_main_load_stops_the_other_ranks(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), main_first.main_process_first("org/x/train", local_rank=0, world_size=2,
                                                                     cache_dir=tmp_path):
        raise RuntimeError("gated")
    with pytest.raises(UserError, match="the main process could not load it"), main_first.main_process_first(
            "org/x/train", local_rank=1, world_size=2, cache_dir=tmp_path, timeout_s=5):
        pass


def test_the_hub_loader_goes_main_first(tmp_path: Path, monkeypatch) -> None:
    """`data.load` of a hub id under a two-process launch: local rank 0 loads and leaves the marker that
    rank 1 waits for (the hub client faked at its boundary, `datasets.load_dataset`)."""
    import datasets

    calls = []
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: calls.append(name) or
                        datasets.Dataset.from_list(PAIRS))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    ds, kind = data.load("org/pairs", kind="pairwise")
    assert len(ds) == 8 and calls == ["org/pairs"]
    assert main_first.marker_path("org/pairs/train").read_text() == "ok"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert len(sources.load_raw("org/pairs")) == 8 and calls == ["org/pairs", "org/pairs"]
