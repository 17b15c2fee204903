"""Training / eval records from Hugging Face `datasets`: `dataset:<path>[:split]` in data.train / data.eval.

<path> is a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (read with `load_from_disk`),
or local data files or a folder of them (read with `load_dataset`: JSON/JSONL, CSV, Parquet, text, Arrow).
split picks a split (default "train"; `load_dataset` also takes slices such as train[:1000]). Records come
back as plain dicts, so their columns are detected exactly as for a JSONL file. Nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

from qbara.errors import QbaraError

PREFIX = "dataset:"
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text",
            ".arrow": "arrow"}


def parse_spec(spec: str) -> tuple[Path, str | None]:
    """`<path>[:split]` -> (path, split or None): the longest prefix that exists is the path (a split such as
    train[:100] may hold ':' itself)."""
    cuts = [len(spec)] + [i for i in range(len(spec) - 1, -1, -1) if spec[i] == ":"]
    for cut in cuts:
        path = Path(spec[:cut]).expanduser()
        if spec[:cut] and path.exists():
            split = spec[cut + 1:] if cut < len(spec) else None
            break
    else:
        raise QbaraError(f"{PREFIX}{spec}: not found; give a saved dataset folder or local data files, e.g. "
                         f"dataset:data/my_set or dataset:data/train.jsonl:train")
    if split is not None and not split:
        raise QbaraError(f"{PREFIX}{spec}: empty split name after ':'; write dataset:<path>:<split> or drop the ':'")
    return path, split


def read_dataset(spec: str) -> list[dict]:
    """The records of `dataset:<spec>` (without the prefix) as a list of dicts."""
    path, split = parse_spec(spec)
    try:
        import datasets
    except ImportError:
        raise QbaraError(f"{PREFIX}{spec} reads with Hugging Face datasets, which is not installed: "
                         f"pip install datasets") from None
    if _saved_by_datasets(path):
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            data = _pick_split(data, split, spec)
        elif split is not None:
            raise QbaraError(f"{PREFIX}{spec}: {str(path)!r} holds one saved Dataset, without splits; drop "
                             f"':{split}'")
    else:
        builder = BUILDERS.get(path.suffix.lower()) if path.is_file() else None
        if path.is_file() and builder is None:
            raise QbaraError(f"{PREFIX}{spec}: cannot read {path.suffix!r} files with datasets; use one of "
                             f"{', '.join(sorted(BUILDERS))} or a folder written by save_to_disk")
        try:
            if builder:
                data = datasets.load_dataset(builder, data_files=str(path), split=split or "train")
            else:
                data = datasets.load_dataset(str(path), split=split or "train")
        except (ValueError, KeyError, FileNotFoundError) as err:  # unknown split, no data files, ...
            raise QbaraError(f"{PREFIX}{spec}: datasets could not read it ({err}); check the path and the "
                             f"split name") from None
    return [dict(record) for record in data]


def _saved_by_datasets(path: Path) -> bool:
    """A folder written by save_to_disk: a Dataset (state.json) or a DatasetDict (dataset_dict.json)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _pick_split(data, split: str | None, spec: str):
    splits = list(data)
    name = split or ("train" if "train" in data else (splits[0] if len(splits) == 1 else None))
    if name not in data:
        raise QbaraError(f"{PREFIX}{spec}: no split {name!r} in the saved DatasetDict; its splits are "
                         f"{', '.join(splits)} — write dataset:<path>:<split>")
    return data[name]
