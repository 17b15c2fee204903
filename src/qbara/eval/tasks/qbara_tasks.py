"""Dataset loaders for qbara's bundled lm-eval tasks (the YAMLs' `!function`); the data sits beside this file."""
from pathlib import Path


def shakespeare_next_line(**kwargs):
    """The qbara_shakespeare_next_line records as a DatasetDict with one "test" split."""
    import datasets

    path = Path(__file__).with_name("shakespeare_next_line.jsonl")
    return datasets.DatasetDict({"test": datasets.load_dataset("json", data_files=str(path), split="train")})
