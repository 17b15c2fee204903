"""`dataset:<path>[:split]` training data: read with Hugging Face datasets, columns detected as for JSONL."""
import json
import sys

import pytest

from qbara import QbaraError
from qbara.models import tiny_llama
from qbara.train.config import build_config
from qbara.train.data import build_examples, read_records
from qbara.train.trainer import load_datasets

datasets = pytest.importorskip("datasets")
RECORDS = [{"instruction": f"Add {a} and {b}.", "output": str(a + b)} for a, b in [(1, 2), (30, 4), (7, 7), (9, 0)]]
CHAT = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"hello {i}"}]}
        for i in range(3)]


def _jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _ids(examples):
    return [(e.input_ids, e.labels) for e in examples]


@pytest.mark.parametrize("records", [RECORDS, CHAT], ids=["instruction", "chat"])
def test_a_saved_dataset_trains_on_the_same_examples_as_its_jsonl(records, tmp_path):
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    jsonl = _jsonl(tmp_path / "train.jsonl", records)
    assert read_records(f"dataset:{tmp_path / 'saved'}") == records
    tokenizer = tiny_llama()[1]
    got = {}
    for tag, train in (("dataset", f"dataset:{tmp_path / 'saved'}"), ("jsonl", str(jsonl))):
        config = build_config({"model": "tiny-llama", "data": {"train": train, "max_length": 512},
                               "train": {"output_dir": str(tmp_path / "out"), "steps": 1}})
        got[tag] = _ids(load_datasets(config, tokenizer)[0].examples)
    assert got["dataset"] == got["jsonl"] == _ids(build_examples(records, tokenizer, "auto", 512))


def test_splits_of_a_saved_dataset_dict_and_of_local_files(tmp_path):
    whole = datasets.Dataset.from_list(RECORDS)
    datasets.DatasetDict({"train": whole, "test": whole.select([3])}).save_to_disk(str(tmp_path / "dict"))
    assert read_records(f"dataset:{tmp_path / 'dict'}") == RECORDS  # train by default
    assert read_records(f"dataset:{tmp_path / 'dict'}:test") == RECORDS[3:]
    with pytest.raises(QbaraError, match="no split 'dev'.*train, test"):
        read_records(f"dataset:{tmp_path / 'dict'}:dev")
    jsonl = _jsonl(tmp_path / "files" / "part.jsonl", RECORDS) if (tmp_path / "files").mkdir() is None else None
    assert read_records(f"dataset:{jsonl}:train[:2]") == RECORDS[:2]  # load_dataset on a file, with a slice
    assert read_records(f"dataset:{tmp_path / 'files'}") == RECORDS  # a folder of data files


def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(QbaraError, match="not found"):
        read_records(f"dataset:{tmp_path / 'nope'}")
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(QbaraError, match="one saved Dataset, without splits"):
        read_records(f"dataset:{tmp_path / 'saved'}:test")
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(QbaraError, match="cannot read '.xlsx'"):
        read_records(f"dataset:{tmp_path / 'x.xlsx'}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(QbaraError, match="pip install datasets"):
        read_records(f"dataset:{tmp_path / 'saved'}")
