"""Bad and lossy data input (issue 9, part B): each case ends in one line naming the file, row and
field (exit 2 from the CLI), or in rows dropped with a count — never in a traceback or silence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_cli

from alignkit import data
from alignkit.errors import UserError


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def one_error_line(code: int, err: str) -> str:
    """The CLI's bad-input contract: exit 2 and a single 'error:' line, no traceback."""
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (code, err)
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------- --columns


def test_two_targets_from_one_source_column_is_refused(monkeypatch, capsys):
    with pytest.raises(UserError, match="'question' is mapped to both 'prompt' and 'completion'"):
        data.parse_columns("prompt=question,completion=question")
    # the same mapping from a recipe (a dict) is refused by the loader
    with pytest.raises(UserError, match="mapped to both"):
        data.load("builtin:sft", columns={"prompt": "prompt", "completion": "prompt"}, max_samples=4)
    code, _, err = run_cli(
        ["data", "inspect", "builtin:sft", "--columns", "prompt=prompt,completion=prompt"], monkeypatch, capsys
    )
    assert "--columns" in one_error_line(code, err)


def test_one_source_column_under_different_nested_paths_is_fine(tmp_path):
    src = write_jsonl(tmp_path / "n.jsonl", [{"q": {"a": "2+2=", "b": " 4"}}])
    ds, kind = data.load(src, columns="prompt=q.a,completion=q.b")
    assert kind == "sft" and ds[0] == {"prompt": "2+2=", "completion": " 4"}


# --------------------------------------------------------------------------- deeply nested JSON


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_json_names_the_file_and_line(tmp_path, depth, monkeypatch, capsys):
    deep = "[" * depth + "]" * depth  # 100 levels: too deep for Arrow; 100000: for Python's parser
    path = tmp_path / "deep.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n' + f'{{"prompt": "a", "completion": "b", "meta": {deep}}}\n')
    with pytest.raises(UserError, match=r"deep\.jsonl line 2.*nested more than"):
        data.load(str(path))
    code, _, err = run_cli(["data", "inspect", str(path)], monkeypatch, capsys)
    line = one_error_line(code, err)
    assert "deep.jsonl line 2" in line and "flatten" in line


def test_deeply_nested_json_file(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match="deep.json: the JSON is nested more than"):
        data.load(str(path))


def test_ordinary_nesting_still_loads(tmp_path):
    call = {"function": {"name": "f", "arguments": {"x": [1]}}}
    tool_call = {"role": "assistant", "content": "ok", "tool_calls": [call]}
    src = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"}, tool_call]}])
    ds, kind = data.load(src)
    assert kind == "sft" and ds[0]["messages"][1]["content"] == "ok"


# --------------------------------------------------------------------------- messages holding a string


def test_messages_column_holding_a_string_is_refused(tmp_path, monkeypatch, capsys):
    only_strings = write_jsonl(tmp_path / "s.jsonl", [{"messages": "hello"}, {"messages": "there"}])
    with pytest.raises(UserError, match=r"s\.jsonl: row 1: field 'messages' holds a string"):
        data.load(only_strings)
    code, _, err = run_cli(["data", "inspect", only_strings], monkeypatch, capsys)
    line = one_error_line(code, err)
    assert "s.jsonl: row 1: field 'messages'" in line and "text" in line
    # the advice works: mapped to text, the same file loads
    ds, _ = data.load(only_strings, columns="text=messages")
    assert ds.column_names == ["text"]


# --------------------------------------------------------------------------- identical pairs


def _pairs(n_same: int, n_diff: int) -> list[dict]:
    same = [{"prompt": f"p{i}", "chosen": " a", "rejected": " a"} for i in range(n_same)]
    diff = [{"prompt": f"q{i}", "chosen": " a", "rejected": " b"} for i in range(n_diff)]
    return same + diff


def test_pairs_whose_chosen_equals_rejected_are_dropped_and_counted(tmp_path, capsys):
    src = write_jsonl(tmp_path / "p.jsonl", _pairs(2, 4))
    dropped: dict[str, int] = {}
    ds, kind = data.load(src, dropped=dropped)
    assert kind == "pairwise" and len(ds) == 4 and all(r["chosen"] != r["rejected"] for r in ds)
    assert dropped == {"chosen_equals_rejected": 2}
    err = capsys.readouterr().err
    assert "p.jsonl: dropped 2 of 6 rows (chosen_equals_rejected: 2" in err and err.count("\n") == 1
    # as KTO data (unpaired from pairs) they go too; as prompts they are still prompts
    assert len(data.load(src, kind="unpaired")[0]) == 8
    assert len(data.load(src, kind="prompts")[0]) == 6
    # conversational pairs: compared as message lists
    x, y = [{"role": "assistant", "content": "x"}], [{"role": "assistant", "content": "y"}]
    conv = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "chosen": x, "rejected": x},
                                              {"prompt": "p", "chosen": x, "rejected": y}])
    assert len(data.load(conv)[0]) == 1


def test_only_identical_pairs_fail_clearly(tmp_path, monkeypatch, capsys):
    src = write_jsonl(tmp_path / "p.jsonl", _pairs(3, 0))
    with pytest.raises(UserError, match="all 3 rows were dropped"):
        data.load(src)
    out = tmp_path / "out.jsonl"
    code, _, err = run_cli(["data", "convert", src, str(out)], monkeypatch, capsys)
    assert "chosen_equals_rejected" in one_error_line(code, err) and not out.exists()


# --------------------------------------------------------------------------- the count helper


def test_note_dropped_counts_prints_once_and_refuses_nothing_left(capsys):
    assert data.note_dropped("d.jsonl", 10, {"too_long": 0}) == {}
    assert capsys.readouterr().err == ""
    assert data.note_dropped("d.jsonl", 10, {"too_long": 3, "chosen_equals_rejected": 1}) == {
        "too_long": 3, "chosen_equals_rejected": 1}
    err = capsys.readouterr().err
    assert err.startswith("d.jsonl: dropped 4 of 10 rows (too_long: 3") and err.count("\n") == 1
    with pytest.raises(UserError, match="d.jsonl: all 2 rows were dropped .* nothing is left"):
        data.note_dropped("d.jsonl", 2, {"too_long": 2})


def test_train_eval_split_follows_the_data_section():
    from alignkit.config import DataSection

    ds, _ = data.load("builtin:sft", max_samples=20)
    assert data.train_eval_split(ds, DataSection()) == {"train": ds, "eval": None}
    parts = data.train_eval_split(ds, DataSection(eval_fraction=0.25, seed=1))
    assert (len(parts["train"]), len(parts["eval"])) == (15, 5)
    same = data.split(ds, (0.75, 0.25), 1, ("train", "eval"))
    assert all(parts[k]["prompt"][:] == same[k]["prompt"][:] for k in ("train", "eval"))


def test_dpo_and_rm_count_the_pairs_trl_drops_as_too_long(tmp_path, tiny_model_dir):
    """TRL's DPOTrainer drops pairs whose prompt fills max_length and RewardTrainer pairs with a side
    longer than it, silently: alignkit counts them in summary.json (`dropped_rows`)."""
    from alignkit.trainers import preference, reward

    long_prompt = "the cable was great . " * 40
    rows = [{"prompt": "review :", "chosen": f" good {i} .", "rejected": f" bad {i} ."} for i in range(6)]
    rows += [{"prompt": long_prompt, "chosen": " good .", "rejected": " bad ."} for _ in range(2)]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"model": {"name": str(tiny_model_dir), "device": "cpu"}, "data": {"source": str(src)},
              "train": {"max_length": 48, "max_steps": 1, "batch_size": 2, "save_steps": 0}}
    dpo = preference.run(preference.DPOConfig(**common, output={"dir": str(tmp_path / "dpo")}))
    assert dpo["dropped_rows"] == {"too_long": 2} and dpo["train_rows"] == 6
    common["data"]["eval_fraction"] = 0.0
    rm = reward.run(reward.RMConfig(**common, eval={"ood_source": None}, output={"dir": str(tmp_path / "rm")}))
    assert rm["dropped_rows"] == {"pair_too_long": 2} and rm["train_pairs"] == 6
    assert json.loads((tmp_path / "rm" / "summary.json").read_text())["dropped_rows"] == {"pair_too_long": 2}


def test_dpo_with_every_pair_too_long_leaves_nothing_behind(tmp_path, tiny_model_dir):
    from alignkit.trainers import preference

    rows = [{"prompt": "the cable was great . " * 40, "chosen": f" good {i} .", "rejected": " bad ."} for i in range(4)]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = preference.DPOConfig(model={"name": str(tiny_model_dir), "device": "cpu"}, data={"source": str(src)},
                               train={"max_length": 48, "max_steps": 1, "batch_size": 2},
                               output={"dir": str(tmp_path / "dpo")})
    with pytest.raises(UserError, match="all 4 rows were dropped"):
        preference.run(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]  # no DIR, DIR.partial or DIR.lock
