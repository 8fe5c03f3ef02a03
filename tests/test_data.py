"""alignkit.data: every kind, the real schemas (tests/fixtures), mapping, splits, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignkit import data
from alignkit.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"
USER = "user"


def msgs(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in pairs]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def load_rows(rows: list[dict], **kw) -> tuple[datasets.Dataset, str]:
    return data.normalise(datasets.Dataset.from_list(rows), source_name="t.jsonl", **kw)


# --------------------------------------------------------------------------- kinds


def test_detect_kind_table():
    assert data.detect_kind(["chosen", "rejected"]) == "pairwise"
    assert data.detect_kind(["prompt", "chosen", "rejected", "messages"]) == "pairwise"
    assert data.detect_kind(["prompt", "completion", "label"]) == "unpaired"
    assert data.detect_kind(["prompt", "completion", "reward", "label"]) == "scored"
    assert data.detect_kind(["prompt", "completion"]) == "sft"
    assert data.detect_kind(["messages"]) == "sft"
    assert data.detect_kind(["text", "id"]) == "sft"
    assert data.detect_kind(["prompt", "id"]) == "prompts"
    assert data.detect_kind(["info", "summaries", "choice", "worker"]) == "pairwise"
    assert data.detect_kind(["task_id", "text", "code", "test_list"]) == "sft"  # MBPP, not "text" sft
    assert data.detect_kind(["question", "answer"]) is None


def test_sft_three_forms_and_conversational():
    ds, kind = load_rows([{"prompt": "2+2=", "completion": " 4", "id": 1}])
    assert kind == "sft" and ds.column_names == ["prompt", "completion"]
    ds, _ = load_rows([{"messages": msgs((USER, "hi"), ("assistant", "hello"))}])
    assert ds.column_names == ["messages"] and ds[0]["messages"][1]["content"] == "hello"
    ds, _ = load_rows([{"text": "Once upon a time"}])
    assert ds.column_names == ["text"]
    # string prompt with a conversational completion: the prompt becomes a user turn
    ds, _ = load_rows([{"prompt": "hi", "completion": msgs(("assistant", "hello"))}])
    assert ds[0]["prompt"] == msgs((USER, "hi"))
    assert data.describe(ds, "sft")["conversational"] is True


def test_pairwise_explicit_string_and_conversational():
    ds, kind = load_rows([{"prompt": "Q?", "chosen": " good", "rejected": " bad", "prob": 0.9}])
    assert kind == "pairwise" and ds.column_names == ["prompt", "chosen", "rejected", "prob"]
    assert ds[0] == {"prompt": "Q?", "chosen": " good", "rejected": " bad", "prob": 0.9}
    row = {
        "prompt": msgs((USER, "Q?")),
        "chosen": msgs(("assistant", "good")),
        "rejected": msgs(("assistant", "bad")),
    }
    ds, _ = load_rows([row])
    assert ds[0] == row
    assert data.describe(ds, "pairwise")["conversational"] is True


def test_unpaired_label_forms():
    rows = [
        {"prompt": "a", "completion": "x", "label": "yes"},
        {"prompt": "b", "completion": "y", "label": "0"},
        {"prompt": "c", "completion": "z", "label": "TRUE"},
    ]
    ds, kind = load_rows(rows)
    assert kind == "unpaired" and ds["label"] == [True, False, True]
    ds, _ = load_rows([{"prompt": msgs((USER, "a")), "completion": msgs(("assistant", "x")), "label": 1}])
    assert ds[0]["label"] is True and ds[0]["completion"] == msgs(("assistant", "x"))
    assert data.describe(ds, "unpaired")["stats"]["fraction_label_true"] == 1.0


def test_prompts_and_scored():
    ds, kind = load_rows([{"prompt": "Tell me a joke", "source": "x"}])
    assert kind == "prompts" and ds.column_names == ["prompt"]
    ds, _ = load_rows([{"prompt": msgs((USER, "Tell me a joke"))}])
    assert ds[0]["prompt"][0]["role"] == USER
    ds, kind = load_rows(
        [
            {"prompt": "p", "completion": "c", "reward": "1.5"},
            {"prompt": "q", "completion": "d", "reward": "-2"},
        ]
    )
    assert kind == "scored" and ds["reward"] == [1.5, -2.0]
    assert data.describe(ds, "scored")["stats"]["reward"]["min"] == -2.0


def test_kind_conversions():
    rows = [{"prompt": "p", "chosen": " a", "rejected": " b"}]
    ds, kind = load_rows(rows, kind="sft")
    assert kind == "sft" and ds[0] == {"prompt": "p", "completion": " a"}
    ds, _ = load_rows(rows, kind="prompts")
    assert ds.column_names == ["prompt"]
    with pytest.raises(UserError, match="kind 'pairwise' needs columns chosen, rejected"):
        load_rows([{"prompt": "p"}], kind="pairwise")


# --------------------------------------------------------------------------- real schemas


def test_hh_rlhf_implicit_prompt():
    ds, kind = data.load(str(FIXTURES / "hh_rlhf.jsonl"))
    assert kind == "pairwise" and len(ds) == 4
    row = ds[0]
    assert row["prompt"].startswith("\n\nHuman: What are some good ways to keep basil")
    assert row["prompt"].endswith("\n\nHuman: How often should I harvest it?\n\nAssistant:")
    assert row["prompt"].count("\n\nAssistant:") == 2  # split at the LAST shared marker
    assert row["chosen"].startswith(" Every week") and row["rejected"] == " Whenever you want."
    raw = data.load_raw(str(FIXTURES / "hh_rlhf.jsonl"))
    assert all(p + c == r for p, c, r in zip(ds["prompt"], ds["chosen"], raw["chosen"], strict=True))
    assert data.describe(ds, kind)["conversational"] is False


def test_ultrafeedback_binarized():
    ds, kind = data.load(str(FIXTURES / "ultrafeedback_binarized.parquet"))
    assert kind == "pairwise"
    assert ds.column_names == ["prompt", "chosen", "rejected", "score_chosen", "score_rejected"]
    row = ds[0]
    assert row["prompt"] == [{"content": "How many minutes are there in a week?", "role": USER}]
    assert [m["role"] for m in row["chosen"]] == ["assistant"] == [m["role"] for m in row["rejected"]]
    assert row["rejected"][0]["content"] == "A week has 1,440 minutes."
    assert (row["score_chosen"], row["score_rejected"]) == (9.0, 3.0)


def test_summarize_from_feedback_comparisons():
    ds, kind = data.load(str(FIXTURES / "summarize_comparisons.jsonl"))
    assert kind == "pairwise" and len(ds) == 3
    assert ds[0]["prompt"].startswith("SUBREDDIT: r/relationships\nTITLE: My [25F] sister")
    assert "\nPOST: My sister (22F)" in ds[0]["prompt"] and ds[0]["prompt"].endswith("\nTL;DR:")
    assert ds[0]["chosen"].startswith(" my sister keeps using my car")  # choice == 1
    assert ds[1]["chosen"].startswith(" new runner")  # choice == 0
    cnn = ds[2]["prompt"]  # CNN/DM row: post is null, article is set
    assert cnn.startswith("TITLE: Council approves") and "\nARTICLE: City councillors" in cnn
    assert "SUBREDDIT" not in cnn and "POST" not in cnn


def test_mbpp_as_sft_and_prompts():
    ds, kind = data.load(str(FIXTURES / "mbpp.jsonl"))
    assert kind == "sft" and ds.column_names == ["prompt", "completion", "test_list", "test_setup_code"]
    assert ds[0]["prompt"] == (
        "You are an expert Python programmer, and here is your task: Write a function to find the "
        "shared elements from the given two lists. Your code should pass these tests:\n\n"
        "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n"
        "assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))\n"
    )
    assert ds[0]["completion"].startswith("def similar_elements")
    assert len(ds[1]["test_list"]) == 3
    ds, kind = data.load(str(FIXTURES / "mbpp.jsonl"), kind="prompts")
    assert kind == "prompts" and ds.column_names == ["prompt", "test_list", "test_setup_code"]


# --------------------------------------------------------------------------- implicit prompts


def test_implicit_prompt_generic_fallback_cuts_at_whitespace():
    ds, _ = load_rows([{"chosen": "I like cats", "rejected": "I like catfish"}])
    assert ds[0] == {"prompt": "I like ", "chosen": "cats", "rejected": "catfish"}


def test_implicit_prompt_conversational():
    shared = msgs((USER, "hi"), ("assistant", "hello"), (USER, "how are you?"))
    ds, _ = load_rows(
        [
            {
                "chosen": shared + msgs(("assistant", "fine")),
                "rejected": shared + msgs(("assistant", "go away")),
            }
        ]
    )
    assert ds[0]["prompt"] == shared and ds[0]["chosen"] == msgs(("assistant", "fine"))


def test_implicit_prompt_without_common_prefix_names_row():
    rows = [{"chosen": "a b", "rejected": "a c"}, {"chosen": "yes", "rejected": "no"}]
    with pytest.raises(UserError, match=r"t.jsonl: row 2: 'chosen' and 'rejected' share no prompt prefix"):
        load_rows(rows)


# --------------------------------------------------------------------------- column mapping


def test_parse_columns():
    assert data.parse_columns("prompt=question, chosen=response_j,rejected=response_k") == {
        "prompt": "question",
        "chosen": "response_j",
        "rejected": "response_k",
    }
    assert data.parse_columns(None) == {} == data.parse_columns(" ")
    with pytest.raises(UserError, match="'prompt' is not of the form canonical=source"):
        data.parse_columns("prompt")
    with pytest.raises(UserError, match='unknown canonical column .promt.*did you mean "prompt"'):
        data.parse_columns("promt=question")


def test_column_mapping_rename_and_swap():
    rows = [{"question": "Q", "response_j": "good", "response_k": "bad"}]
    ds, kind = load_rows(
        rows, columns=data.parse_columns("prompt=question,chosen=response_j,rejected=response_k")
    )
    assert kind == "pairwise" and ds[0] == {"prompt": "Q", "chosen": "good", "rejected": "bad"}
    ds, _ = load_rows(
        [{"prompt": "Q", "chosen": "x", "rejected": "y"}],
        columns={"chosen": "rejected", "rejected": "chosen"},
    )
    assert ds[0] == {"prompt": "Q", "chosen": "y", "rejected": "x"}


def test_column_mapping_nested(tmp_path):
    spec = "prompt=info.post,chosen=summaries[0].text,rejected=summaries.1.text"
    ds, kind = data.load(str(FIXTURES / "summarize_comparisons.jsonl"), columns=spec, max_samples=2)
    assert kind == "pairwise" and len(ds) == 2
    assert ds[0]["prompt"].startswith("My sister (22F)") and ds[0]["chosen"].startswith(" sister borrows")
    with pytest.raises(UserError, match=r"row 1: cannot read 'summaries\[5\].text': index 5 out of range"):
        data.load(
            str(FIXTURES / "summarize_comparisons.jsonl"),
            columns="prompt=info.post,chosen=summaries[5].text,rejected=summaries.1.text",
        )


def test_column_mapping_unknown_column_suggests():
    with pytest.raises(
        UserError, match=r"--columns prompt=questoin: no column 'questoin' \(did you mean \"question\"\?\)"
    ):
        load_rows([{"question": "Q", "answer": "A"}], columns={"prompt": "questoin"})


# --------------------------------------------------------------------------- splits / unpair / output


def test_split_deterministic_disjoint_covering():
    ds = datasets.Dataset.from_dict({"prompt": [f"p{i}" for i in range(10)]})
    parts = data.split(ds, (0.2, 0.4, 0.4), seed=3, names=("sft", "rm", "rl"))
    assert {k: len(v) for k, v in parts.items()} == {"sft": 2, "rm": 4, "rl": 4}
    seen = [p for part in parts.values() for p in part["prompt"]]
    assert sorted(seen) == sorted(ds["prompt"]) and len(set(seen)) == 10
    again = data.split(ds, (0.2, 0.4, 0.4), seed=3, names=("sft", "rm", "rl"))
    assert all(parts[k]["prompt"] == again[k]["prompt"] for k in parts)
    other = data.split(ds, (0.2, 0.4, 0.4), seed=4, names=("sft", "rm", "rl"))
    assert any(parts[k]["prompt"] != other[k]["prompt"] for k in parts)
    assert set(data.split(ds, (0.5, 0.5), seed=0)) == {"train", "eval"}
    sizes = [
        len(v)
        for v in data.split(datasets.Dataset.from_dict({"x": list(range(7))}), (0.2, 0.4, 0.4), 0).values()
    ]
    assert sum(sizes) == 7


def test_split_bad_ratios():
    ds = datasets.Dataset.from_dict({"prompt": ["a", "b", "c"]})
    with pytest.raises(UserError, match="sum to 1"):
        data.split(ds, (0.2, 0.4), seed=0)
    with pytest.raises(UserError, match="part 'sft' would be empty"):
        data.split(ds, (0.1, 0.45, 0.45), seed=0, names=("sft", "rm", "rl"))


def test_unpair():
    ds, _ = data.load(str(FIXTURES / "hh_rlhf.jsonl"))
    un = data.unpair(ds)
    assert un.column_names == ["prompt", "completion", "label"] and len(un) == 8
    assert un["label"] == [True] * 4 + [False] * 4
    assert un[0]["completion"] == ds[0]["chosen"] and un[4]["completion"] == ds[0]["rejected"]
    assert un[4]["prompt"] == ds[0]["prompt"]


def test_to_jsonl_round_trip(tmp_path):
    ds, kind = data.load(str(FIXTURES / "ultrafeedback_binarized.parquet"))
    out = tmp_path / "sub" / "uf.jsonl"
    data.to_jsonl(ds, out)
    assert [p.name for p in out.parent.iterdir()] == ["uf.jsonl"]  # no temporary file left
    back, kind2 = data.load(str(out))
    assert kind2 == kind and back.to_list() == ds.to_list()


def test_max_samples_first_n():
    ds, _ = data.load(str(FIXTURES / "hh_rlhf.jsonl"), max_samples=2)
    full, _ = data.load(str(FIXTURES / "hh_rlhf.jsonl"))
    assert ds.to_list() == full.to_list()[:2]
    ds, _ = data.load(str(FIXTURES / "hh_rlhf.jsonl"), kind="unpaired", max_samples=3)
    assert len(ds) == 3


# --------------------------------------------------------------------------- sources


def test_saved_dataset_dirs(tmp_path):
    rows = {"prompt": ["a", "b"], "completion": ["x", "y"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    ds, kind = data.load(str(tmp_path / "ds"))
    assert kind == "sft" and ds["prompt"] == ["a", "b"]
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(rows),
            "test": datasets.Dataset.from_dict({"prompt": ["t"], "completion": ["u"]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    ds, _ = data.load(str(tmp_path / "dd"), split="test")
    assert ds["prompt"] == ["t"]
    with pytest.raises(
        UserError, match=r"no split 'tset' \(did you mean \"test\"\?\) — available: train, test"
    ):
        data.load(str(tmp_path / "dd"), split="tset")


def test_csv_parquet_json_sources(tmp_path):
    (tmp_path / "d.csv").write_text("prompt,completion,label\nhi,hello,true\nbye,whatever,0\n")
    ds, kind = data.load(str(tmp_path / "d.csv"))
    assert kind == "unpaired" and ds["label"] == [True, False]
    pq.write_table(pa.table({"prompt": ["p"], "completion": ["c"], "reward": [0.5]}), tmp_path / "d.parquet")
    ds, kind = data.load(str(tmp_path / "d.parquet"))
    assert kind == "scored" and ds["reward"] == [0.5]
    (tmp_path / "l.json").write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}]))
    ds, kind = data.load(str(tmp_path / "l.json"))
    assert kind == "prompts" and len(ds) == 2
    (tmp_path / "s.json").write_text(json.dumps({"train": [{"prompt": "a"}], "test": [{"prompt": "z"}]}))
    assert data.load(str(tmp_path / "s.json"), split="test")[0]["prompt"] == ["z"]
    write_jsonl(tmp_path / "lines.json", [{"text": "a"}, {"text": "b"}])  # JSON Lines named .json
    assert len(data.load(str(tmp_path / "lines.json"))[0]) == 2


def test_apply_chat_template_if_any():
    conv = msgs((USER, "hi"), ("assistant", "hello"))
    assert (
        data.apply_chat_template_if_any(None, "\n\nHuman: hi\n\nAssistant:", True)
        == "\n\nHuman: hi\n\nAssistant:"
    )
    assert data.apply_chat_template_if_any(None, conv, True) == "user: hi\nassistant: hello\nassistant:"

    class Tok:
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert tokenize is False
            return "<|" + "|".join(m["content"] for m in messages) + ("|>" if add_generation_prompt else "")

    assert data.apply_chat_template_if_any(Tok(), conv, True) == "<|hi|hello|>"


# --------------------------------------------------------------------------- bad input: one clear line each


def bad(tmp_path: Path, rows: list[dict], match: str, **kw) -> None:
    src = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError, match=match) as err:
        data.load(src, **kw)
    assert "\n" not in str(err.value)


def test_bad_malformed_jsonl_line(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"prompt": "a"}\n\n{"prompt": "b"\n')
    with pytest.raises(
        UserError, match=r"train.jsonl line 3: invalid JSON \(Expecting ',' delimiter.*fix or remove"
    ):
        data.load(str(p))


def test_bad_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="empty.jsonl: the dataset is empty"):
        data.load(str(tmp_path / "empty.jsonl"))


def test_bad_missing_column(tmp_path):
    bad(
        tmp_path,
        [{"prompt": "a", "answer": "b"}],
        r"kind .pairwise. needs columns chosen, rejected.*has prompt, answer.*--columns prompt=<col>,chosen=",
        kind="pairwise",
    )


def test_bad_unknown_layout(tmp_path):
    bad(
        tmp_path,
        [{"question": "a", "answer": "b"}],
        r"bad.jsonl: cannot tell the data kind from columns question, answer.*--columns",
    )


def test_bad_null_and_empty_values(tmp_path):
    bad(
        tmp_path,
        [{"prompt": "a", "completion": "b"}, {"prompt": None, "completion": "c"}],
        r"bad.jsonl: row 2: field 'prompt' is missing \(null\)",
    )
    bad(tmp_path, [{"prompt": "a", "chosen": "b", "rejected": "   "}], r"row 1: field 'rejected' is empty")
    bad(tmp_path, [{"messages": []}], r"row 1: field 'messages' is an empty message list")


def test_bad_label_reward_prob(tmp_path):
    bad(
        tmp_path,
        [{"prompt": "a", "completion": "b", "label": "maybe"}],
        r"row 1: field 'label' must be true/false.*'maybe'",
    )
    bad(
        tmp_path,
        [{"prompt": "a", "completion": "b", "reward": "high"}],
        r"row 1: field 'reward' must be a finite number, got 'high'",
    )
    bad(
        tmp_path,
        [{"prompt": "a", "chosen": "b", "rejected": "c", "prob": 1.5}],
        r"row 1: field 'prob' must be in \[0, 1\], got 1.5",
    )


def test_bad_mixed_row_types(tmp_path):
    bad(
        tmp_path,
        [{"prompt": "a"}, {"prompt": ["x", 1]}],
        r"bad.jsonl line 2: field 'prompt' is a list but line 1 has a string",
    )
    bad(
        tmp_path,
        [{"prompt": msgs((USER, "a")), "chosen": "b", "rejected": "c"}],
        r"row 1: 'prompt' is a message list but 'chosen' is a plain string",
    )
    bad(tmp_path, [{"prompt": [{"role": "user"}]}], r"row 1: field 'prompt' must be a list of")


def test_bad_files_and_sources(tmp_path, monkeypatch):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(UserError, match=r"d.txt: unsupported file type '.txt'"):
        data.load(str(tmp_path / "d.txt"))
    with pytest.raises(UserError, match=r"nope.jsonl: file not found"):
        data.load(str(tmp_path / "nope.jsonl"))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(UserError, match=r"bad.parquet: cannot read as parquet"):
        data.load(str(tmp_path / "bad.parquet"))

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'foo/bar' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(data.sources, "_hub_reachable", lambda: True)
    with pytest.raises(
        UserError, match=r"cannot load 'foo/bar' from the Hugging Face hub \(offline\?\).*pass the local path"
    ):
        data.load("foo/bar")
    monkeypatch.setattr(data.sources, "_hub_reachable", lambda: False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with pytest.raises(UserError, match=r"cannot load 'org/x:cfg' .*hub unreachable; set HF_HUB_OFFLINE=1"):
        data.load("org/x:cfg")


def test_bad_kind_and_args(tmp_path):
    bad(
        tmp_path,
        [{"prompt": "a"}],
        r"unknown data kind 'pairwize' \(did you mean \"pairwise\"\?\)",
        kind="pairwize",
    )
    bad(tmp_path, [{"prompt": "a"}], r"max_samples must be a positive integer", max_samples=0)
    bad(
        tmp_path,
        [
            {
                "info": {"post": None, "article": None, "title": "t"},
                "summaries": [{"text": "a"}, {"text": "b"}],
                "choice": 0,
            }
        ],
        r"row 1: field 'info' has neither 'post' nor 'article'",
    )
