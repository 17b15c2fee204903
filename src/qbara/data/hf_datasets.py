"""Training / eval records from Hugging Face `datasets`: `dataset:<path>[:split]` in data.train / data.eval.

<path> is a `save_to_disk` folder or local data files (JSON/JSONL, CSV, Parquet, text, Arrow); split defaults to
"train". Records come back as plain dicts. Nothing is downloaded; files are checked before pyarrow opens them.
"""
from __future__ import annotations

import os
from pathlib import Path

from qbara.errors import QbaraError
from qbara.validate import parse_json, read_json_file, read_text_file, regular_file, short_repr

_PREFIX = "dataset:"
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text",
            ".arrow": "arrow"}


def _parse_spec(spec: str) -> tuple[Path, str | None]:
    """`<path>[:split]` -> (path, split or None); the longest existing prefix is the path (splits may hold ':')."""
    cuts = [len(spec)] + [i for i in range(len(spec) - 1, -1, -1) if spec[i] == ":"]
    for cut in cuts:
        path = Path(spec[:cut]).expanduser()
        if spec[:cut] and path.exists():
            split = spec[cut + 1:] if cut < len(spec) else None
            break
    else:
        raise QbaraError(f"{_PREFIX}{spec}: not found; give a saved dataset folder or local data files, e.g. "
                         f"dataset:data/my_set or dataset:data/train.jsonl:train")
    if split is not None and not split:
        raise QbaraError(f"{_PREFIX}{spec}: empty split name after ':'; write dataset:<path>:<split> or drop the ':'")
    return path, split


def read_dataset(spec: str) -> list[dict]:
    """The records of `dataset:<spec>` (without the prefix) as a list of dicts."""
    path, split = _parse_spec(spec)
    try:
        import datasets
    except ImportError:
        raise QbaraError(f"{_PREFIX}{spec} reads with Hugging Face datasets, which is not installed: "
                         f"pip install datasets") from None
    _check_files(path)
    hint = "" if is_saved_dataset(path) else "check the path and the split name"  # load_dataset's split names
    data = _guarded(spec, path, hint, _load, datasets, path, split, spec)
    return _guarded(spec, path, "", _records, data)


def _load(datasets, path: Path, split: str | None, spec: str):
    """The Dataset of `path` (one split), read by datasets."""
    if is_saved_dataset(path):
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            return _pick_split(data, split, spec)
        if split is not None:
            raise QbaraError(f"{_PREFIX}{spec}: {str(path)!r} holds one saved Dataset, without splits; drop "
                             f"':{split}'")
        return data
    builder = _BUILDERS.get(path.suffix.lower()) if path.is_file() else None
    if path.is_file() and builder is None:
        raise QbaraError(f"{_PREFIX}{spec}: cannot read {path.suffix!r} files with datasets; use one of "
                         f"{', '.join(sorted(_BUILDERS))} or a folder written by save_to_disk")
    if builder:
        return datasets.load_dataset(builder, data_files=str(path), split=split or "train")
    return datasets.load_dataset(str(path), split=split or "train")


def _records(data) -> list[dict]:
    """Plain dicts, after pyarrow's full validation of the table (a damaged Arrow file is refused first)."""
    for table in (getattr(data, "data", None), getattr(data, "_indices", None)):
        if table is not None:
            getattr(table, "table", table).validate(full=True)
    return [dict(record) for record in data]


def _guarded(spec: str, path: Path, hint: str, call, *args):
    """`call(*args)` with any failure of datasets / pyarrow turned into one QbaraError naming the path."""
    try:
        return call(*args)
    except QbaraError:
        raise
    except Exception as err:  # noqa: BLE001 - the one boundary with datasets / pyarrow; BaseException passes
        fix = f"{hint}; if they are right, the" if hint else "the"
        raise QbaraError(f"{_PREFIX}{spec}: datasets could not read {str(path)!r} ({_reason(err)}); {fix} dataset "
                         f"is damaged: write it again") from None


def _reason(err: BaseException) -> str:
    """The innermost cause of `err` (datasets wraps pyarrow's errors) as one short line."""
    seen = {id(err)}
    while err.__cause__ is not None and id(err.__cause__) not in seen:
        err = err.__cause__
        seen.add(id(err))
    text = " ".join(str(err).split())
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _pick_split(data, split: str | None, spec: str):
    splits = list(data)
    name = split or ("train" if "train" in data else (splits[0] if len(splits) == 1 else None))
    if name not in data:
        raise QbaraError(f"{_PREFIX}{spec}: no split {name!r} in the saved DatasetDict; its splits are "
                         f"{', '.join(splits)} — write dataset:<path>:<split>")
    return data[name]


def is_saved_dataset(path: Path) -> bool:
    """A folder written by save_to_disk: a Dataset (state.json) or a DatasetDict (dataset_dict.json)."""
    path = Path(path)
    return path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())


# ---------------------------------------------------------------- checks before datasets opens a file


def _check_files(path: Path) -> None:
    """Refuse what would make datasets / pyarrow hang or crash: non-regular files (a pipe blocks for ever),
    saved metadata naming files outside its folder, JSON nested deeper than qbara allows (pyarrow recurses)."""
    if path.is_dir():
        _check_tree(path)
        if is_saved_dataset(path):
            _check_saved(path)
    else:
        regular_file(path, "dataset file")
    for file in [path] if path.is_file() else sorted(path.rglob("*")):
        if file.suffix.lower() in (".json", ".jsonl") and file.name not in _SAVED_METADATA:
            _check_json_data(file)


_SAVED_METADATA = ("state.json", "dataset_info.json", "dataset_dict.json")


def _check_tree(folder: Path) -> None:
    """Every entry under `folder` is a regular file or a real folder (symlinks followed, loops refused)."""
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if (Path(root) / d).is_symlink()]:
            regular_file(Path(root) / name, "dataset file")


def _check_saved(folder: Path) -> None:
    """A save_to_disk folder: a DatasetDict's split folders in turn, or a Dataset's metadata and data files."""
    if (folder / "dataset_dict.json").exists():
        meta = read_json_file(folder / "dataset_dict.json", "dataset_dict.json", fix=_REWRITE)
        splits = meta.get("splits")
        if not isinstance(splits, list) or not splits or not all(_plain_name(s) for s in splits):
            raise QbaraError(f"{folder / 'dataset_dict.json'}: 'splits' must be a list of split names, got "
                             f"{short_repr(splits, 60)}; {_REWRITE}")
        for split in splits:
            if not is_saved_dataset(folder / split):
                raise QbaraError(f"{folder / split}: split {split!r} of the saved DatasetDict is missing or not a "
                                 f"saved Dataset; {_REWRITE}")
            _check_saved(folder / split)
        return
    state = read_json_file(folder / "state.json", "state.json", fix=_REWRITE)
    if (folder / "dataset_info.json").exists():
        read_json_file(folder / "dataset_info.json", "dataset_info.json", fix=_REWRITE)
    files = state.get("_data_files")
    names = [f.get("filename") if isinstance(f, dict) else None for f in files] if isinstance(files, list) else []
    if not names or not all(_plain_name(name) for name in names):
        raise QbaraError(f"{folder / 'state.json'}: '_data_files' must list the dataset's .arrow files by name, "
                         f"got {short_repr(files, 60)}; {_REWRITE}")
    for name in names:
        regular_file(folder / name, "dataset data file")


_REWRITE = "the saved dataset is damaged, write it again with save_to_disk"


def _plain_name(name) -> bool:
    """A file or folder name inside its folder: no path separators, not '.' or '..', not absurdly long."""
    return (isinstance(name, str) and 0 < len(name) <= 255 and "/" not in name and "\\" not in name
            and name not in (".", ".."))


def _check_json_data(path: Path) -> None:
    """Check a JSON / JSONL data file with qbara's bounded parser: a list of records or one object a line."""
    text = read_text_file(path, "dataset file", max_bytes=None).removeprefix("\ufeff")
    if not text.strip():
        raise QbaraError(f"{path}: the dataset file holds no records; add records or pass another file")
    if text.lstrip().startswith("["):  # one JSON document: a list of records
        parse_json(text, str(path))
        return
    for number, line in enumerate(text.split("\n"), start=1):  # datasets splits lines on \n only
        if line.strip():
            value = parse_json(line, f"{path}: line {number}")
            if not isinstance(value, dict):
                raise QbaraError(f"{path}: line {number} is {type(value).__name__} {short_repr(value, 60)}, not a JSON "
                                 f"object; each line of a JSONL file is one record {{...}}")
