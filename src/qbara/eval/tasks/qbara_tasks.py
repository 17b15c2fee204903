"""Dataset loaders for qbara's bundled lm-eval tasks (imported by lm-eval through `!function` in the YAMLs).

The data sits next to this file, so the tasks work wherever qbara is installed and offline.
"""
from pathlib import Path


def shakespeare_next_line(**kwargs):
    """The qbara_shakespeare_next_line records as a DatasetDict with one "test" split."""
    import datasets

    path = Path(__file__).with_name("shakespeare_next_line.jsonl")
    return datasets.DatasetDict({"test": datasets.load_dataset("json", data_files=str(path), split="train")})
