"""The data stage: LLaMA-Factory dataset_info.json registry, formats, flags, split, determinism, errors."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

pytest.importorskip("datasets")

from tunepipe.errors import UserError  # noqa: E402
from tunepipe.runtime.context import StepContext  # noqa: E402
from tunepipe.runtime.stages import data  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def run_data(tmp_path: Path, dataset_dir: Path = EXAMPLES, seed: int = 42, **params) -> tuple[Path, dict]:
    out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
    out.mkdir()
    params = {"val_size": 0.0, "stage": "sft", **params}
    ctx = StepContext(
        id="data",
        kind="data",
        key="k",
        params=params,
        inputs={},
        files={"dataset_dir": dataset_dir},
        seed=seed,
        spec_dir=tmp_path,
        out=out,
        work=tmp_path / "work",
        log=logging.getLogger("test"),
    )
    return out, data.run(ctx)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_info(root: Path, info: dict) -> None:
    (root / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")


def test_bundled_datasets_normalise_to_messages(tmp_path):
    out, stats = run_data(tmp_path, dataset=["identity", "tiny_chat", "tiny_openai"])
    assert stats["datasets"] == {
        "identity": {"formatting": "alpaca", "rows": 45, "kept": 45, "dropped": 0},
        "tiny_chat": {"formatting": "sharegpt", "rows": 24, "kept": 24, "dropped": 0},
        "tiny_openai": {"formatting": "openai", "rows": 24, "kept": 24, "dropped": 0},
    }
    train = records(out / "train.jsonl")
    assert train[0] == {
        "messages": [
            {"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": "I am TinyPipe, a tiny model trained by tunepipe."},
        ],
        "tools": None,
    }
    chat = train[45]  # concatenated in the order named
    assert chat["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
    assert [m["role"] for m in chat["messages"][1:]] == ["user", "assistant"] * ((len(chat["messages"]) - 1) // 2)
    assert train[69]["messages"][0]["role"] == "system" and train[70]["messages"][0]["role"] == "user"
    assert (out / "val.jsonl").read_text() == ""


def test_pt_corpus_gives_texts(tmp_path):
    out, stats = run_data(tmp_path, dataset=["tiny_corpus"], stage="pt")
    texts = records(out / "train.jsonl")
    assert len(texts) == 1200 and set(texts[0]) == {"text"}
    first = json.loads((EXAMPLES / "tiny_corpus.jsonl").read_text().splitlines()[0])["text"]
    assert texts[0]["text"] == first


def test_max_samples_applies_per_dataset_in_order(tmp_path):
    out, _ = run_data(tmp_path, dataset=["tiny_chat", "identity"], max_samples=3)
    train = records(out / "train.jsonl")
    assert len(train) == 6
    assert [r["messages"][-1]["content"] for r in train[3:]] == ["I am TinyPipe, a tiny model trained by tunepipe."] * 3
    assert train[3]["messages"][0]["content"] == "Who are you?"


def test_val_split_ratio_count_and_seed(tmp_path):
    out, stats = run_data(tmp_path, dataset=["identity", "tiny_chat", "tiny_openai"], val_size=0.1)
    assert (stats["train"], stats["val"]) == (83, 10)
    train, val = records(out / "train.jsonl"), records(out / "val.jsonl")
    out_all, _ = run_data(tmp_path, dataset=["identity", "tiny_chat", "tiny_openai"])
    everything = records(out_all / "train.jsonl")
    assert sorted(map(json.dumps, train + val)) == sorted(map(json.dumps, everything))
    remaining = iter(everything)  # train keeps file order: a subsequence of the unsplit data
    assert all(any(r == e for e in remaining) for r in train)
    out_same, _ = run_data(tmp_path, dataset=["identity", "tiny_chat", "tiny_openai"], val_size=0.1)
    assert (out_same / "val.jsonl").read_bytes() == (out / "val.jsonl").read_bytes()
    out_other, _ = run_data(tmp_path, dataset=["identity", "tiny_chat", "tiny_openai"], val_size=0.1, seed=7)
    assert (out_other / "val.jsonl").read_bytes() != (out / "val.jsonl").read_bytes()
    _, stats = run_data(tmp_path, dataset=["identity"], val_size=5.0)  # the catalog hands counts over as floats
    assert (stats["train"], stats["val"]) == (40, 5)
    with pytest.raises(UserError, match="leaves no training data"):
        run_data(tmp_path, dataset=["identity"], val_size=45)


def test_same_inputs_same_bytes(tmp_path):
    digests = []
    for _ in range(2):
        out, _ = run_data(tmp_path, dataset=["identity", "tiny_openai"], val_size=0.2)
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()})
    assert digests[0] == digests[1] and set(digests[0]) == {"train.jsonl", "val.jsonl", "stats.json"}


def test_local_files_without_registry_entry(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "chat.jsonl").write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "S"},
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "A"},
                ]
            }
        )
        + "\n"
    )
    (root / "pairs.csv").write_text("instruction,input,output\nAdd 1 and 2,,3\nName a colour,be brief,red\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": ["Hi"], "output": ["Hello"]}), root / "tiny.parquet")
    out, stats = run_data(tmp_path, dataset_dir=root, dataset=["chat.jsonl", "pairs.csv", "tiny.parquet"])
    assert [r["messages"] for r in records(out / "train.jsonl")] == [
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        [{"role": "user", "content": "Add 1 and 2"}, {"role": "assistant", "content": "3"}],
        [{"role": "user", "content": "Name a colour\nbe brief"}, {"role": "assistant", "content": "red"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    ]
    assert stats["datasets"]["chat.jsonl"]["formatting"] == "openai"


def test_directory_dataset_history_system_and_column_flags(tmp_path):
    root = tmp_path / "data"
    (root / "qa").mkdir(parents=True)
    rows = [{"question": "Q2", "answer": "A2", "sys": "Be terse.", "past": [["Q1", "A1"]]}]
    (root / "qa" / "part-0.json").write_text(json.dumps(rows))
    write_info(root, {"qa": {"file_name": "qa", "columns": {"prompt": "q", "response": "a", "system": "sys"}}})
    out, _ = run_data(
        tmp_path,
        dataset_dir=root,
        dataset=["qa"],
        prompt_column="question",
        response_column="answer",
        history_column="past",
    )
    assert records(out / "train.jsonl")[0]["messages"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]


def test_sharegpt_tags_tools_and_broken_conversations(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    rows = [
        {
            "conversations": [
                {"from": "human", "value": "2+2?"},
                {"from": "function_call", "value": '{"name": "add"}'},
                {"from": "observation", "value": "4"},
                {"from": "gpt", "value": "4."},
            ],
            "tools": '[{"name": "add"}]',
        },
        {"conversations": [{"from": "gpt", "value": "starts with the answer"}, {"from": "human", "value": "?"}]},
        {"conversations": [{"from": "human", "value": "no answer"}]},
        {"conversations": [{"from": "alien", "value": "?"}, {"from": "gpt", "value": "!"}]},
    ]
    (root / "tools.json").write_text(json.dumps(rows))
    write_info(
        root,
        {
            "tools": {
                "file_name": "tools.json",
                "formatting": "sharegpt",
                "columns": {"messages": "conversations", "tools": "tools"},
            }
        },
    )
    out, stats = run_data(tmp_path, dataset_dir=root, dataset=["tools"])
    assert stats["datasets"]["tools"] == {"formatting": "sharegpt", "rows": 4, "kept": 1, "dropped": 3}
    record = records(out / "train.jsonl")[0]
    assert [m["role"] for m in record["messages"]] == ["user", "function", "tool", "assistant"]
    assert record["tools"] == '[{"name": "add"}]'


def test_num_samples_is_a_seeded_sample(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "id.json").write_text((EXAMPLES / "identity.json").read_text())
    write_info(
        root, {"few": {"file_name": "id.json", "num_samples": 5}, "many": {"file_name": "id.json", "num_samples": 50}}
    )
    out, stats = run_data(tmp_path, dataset_dir=root, dataset=["few", "many"])
    assert stats["datasets"]["few"]["rows"] == 5 and stats["datasets"]["many"]["rows"] == 50
    again, _ = run_data(tmp_path, dataset_dir=root, dataset=["few", "many"])
    assert (again / "train.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()


def test_paths_escaping_dataset_dir_are_refused(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (tmp_path / "secret.json").write_text(json.dumps([{"instruction": "x", "output": "y"}]))
    write_info(root, {"leak": {"file_name": "../secret.json"}, "abs": {"file_name": str(tmp_path / "secret.json")}})
    for name in ("leak", "abs", "../secret.json"):
        with pytest.raises(UserError, match="outside dataset_dir"):
            run_data(tmp_path, dataset_dir=root, dataset=[name])
    (root / "link.json").symlink_to(tmp_path / "secret.json")
    with pytest.raises(UserError, match="outside dataset_dir"):
        run_data(tmp_path, dataset_dir=root, dataset=["link.json"])


def test_user_errors_name_the_dataset_and_the_fix(tmp_path):
    with pytest.raises(UserError) as err:
        run_data(tmp_path, dataset=["no_such_dataset"])
    assert "no_such_dataset" in err.value.message and "identity" in " ".join(err.value.details)

    root = tmp_path / "data"
    root.mkdir()
    (root / "qa.json").write_text(json.dumps([{"question": "q", "answer": "a"}]))
    write_info(
        root,
        {
            "qa": {"file_name": "qa.json"},
            "ghost": {"file_name": "ghost.json"},
            "odd": {"file_name": "qa.json", "formatting": "chatml"},
        },
    )
    with pytest.raises(UserError, match="column 'instruction'.*missing") as err:
        run_data(tmp_path, dataset_dir=root, dataset=["qa"])
    assert "prompt_column" in " ".join(err.value.details) or "columns" in " ".join(err.value.details)
    with pytest.raises(UserError, match="ghost.json does not exist"):
        run_data(tmp_path, dataset_dir=root, dataset=["ghost"])
    with pytest.raises(UserError, match="formatting 'chatml'"):
        run_data(tmp_path, dataset_dir=root, dataset=["odd"])


def test_hub_dataset_without_a_hub_is_a_clear_error(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    root = tmp_path / "data"
    root.mkdir()
    write_info(root, {"remote": {"hf_hub_url": "tunepipe-tests/does-not-exist"}})
    with pytest.raises(
        UserError, match="remote.*could not load 'tunepipe-tests/does-not-exist' from the Hugging Face hub"
    ) as err:
        run_data(tmp_path, dataset_dir=root, dataset=["remote"])
    assert "dataset_dir" in " ".join(err.value.details)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_json_files_read_as_datasets_reads_them(tmp_path, suffix):
    """The json-module reader gives `datasets.load_dataset("json")`'s rows: file order, every top-level
    column in every row (None where one lacks it), nested values as written; and no `datasets` import."""
    import datasets as hf_datasets

    from tunepipe.runtime import datasets as registry

    rows = [
        {"instruction": "a", "output": "b", "system": "s", "history": [["q", "r"]]},
        {"instruction": "c", "output": "d"},
        {"instruction": "é ✓", "output": "f", "input": "x", "history": []},
    ]
    path = tmp_path / f"rows{suffix}"
    text = "\n".join(json.dumps(r) for r in rows) if suffix == ".jsonl" else json.dumps(rows)
    path.write_text(text, encoding="utf-8")
    ours = registry._json_rows([path])
    theirs = list(
        hf_datasets.load_dataset("json", data_files=[str(path)], split="train", cache_dir=str(tmp_path / "c"))
    )
    assert ours == theirs
    (tmp_path / "obj.json").write_text('{"a": [1, 2]}')
    assert registry._json_rows([tmp_path / "obj.json"]) is None  # a top-level object: datasets reads it
