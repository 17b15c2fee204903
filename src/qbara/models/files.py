"""Reading a model folder's or a GGUF file's non-weight files: the config, the tokenizer, and the one-line error
for what transformers raises on a damaged one. Every loader of `qbara.models` builds these here."""
from __future__ import annotations

import contextlib
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError

from qbara.errors import QbaraError
from qbara.validate import check_no_remote_code, check_tokenizer_config, read_json_file, regular_file

# What transformers raises on a damaged or foreign folder (a bogus hidden_act is a KeyError, a wrong-typed size
# a TypeError, a shape clash a RuntimeError, a weights file check_hf_folder's header check let through a
# SafetensorError, a config value its config class refuses a StrictDataclassError, a pad_token_id past the
# vocabulary torch's AssertionError): one line naming the folder instead of a traceback.
LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError, IndexError, AssertionError,
               SafetensorError, StrictDataclassError)


def one_line(exc: BaseException) -> str:
    """An exception as one short line: its type and its first 300 characters."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


@contextlib.contextmanager
def quiet_transformers():
    """transformers' progress bar and load report off while it loads (restored after)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()



def load_config(folder):
    """The transformers config of a folder's config.json (after `check_hf_folder`); a value its class
    refuses is one QbaraError naming the field."""
    from transformers import AutoConfig

    where = Path(folder) / "config.json"
    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
    except LOAD_ERRORS as exc:
        raise QbaraError(f"{where}: transformers cannot build its config ({one_line(exc)}); the config is damaged "
                         f"(fix the value or get the model again)") from None



_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json")


def load_tokenizer(path: Path):
    """The tokenizer saved in a model folder, or one clear error when the folder has none or a damaged one."""
    from transformers import AutoTokenizer

    path = Path(path)
    names = _TOKENIZER_FILES[:4]
    if not any((path / name).is_file() for name in names):
        raise QbaraError(f"{path} has no tokenizer ({', '.join(names)}); copy the base model's tokenizer files "
                         f"into it")
    _check_tokenizer_files(path)
    check_no_remote_code(path)
    check_tokenizer_config(path)
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except LOAD_ERRORS as exc:
        raise QbaraError(f"Cannot load the tokenizer in {str(path)!r} ({one_line(exc)}); copy the base model's "
                         f"tokenizer files into it") from None
    except Exception as exc:  # tokenizers raises its parse errors (serde's) as a bare Exception
        if type(exc) is not Exception:
            raise
        where = path / "tokenizer.json" if (path / "tokenizer.json").is_file() else path
        raise QbaraError(f"{where}: not a tokenizer the tokenizers library can read ({one_line(exc)}); copy the "
                         f"base model's tokenizer files into the folder") from None


_MAX_TOKENIZER_BYTES = 1 << 28  # a tokenizer.json with a large vocabulary is tens of MB


def _check_tokenizer_files(path: Path) -> None:
    """Each tokenizer file present is a regular file (a pipe would block) and each JSON one
    valid with bounded nesting."""
    for name in _TOKENIZER_FILES:
        file = path / name
        if not (file.exists() or file.is_symlink()):
            continue
        if name.endswith(".json"):
            read_json_file(file, name, fix="copy the base model's tokenizer files into the folder",
                           max_bytes=_MAX_TOKENIZER_BYTES)
        else:
            regular_file(file, f"tokenizer file {name}")


def load_gguf_tokenizer(path: Path):
    """The tokenizer stored in a GGUF file's metadata (never code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    except LOAD_ERRORS as exc:
        raise QbaraError(f"{path}: cannot read its tokenizer ({one_line(exc)}); the GGUF file is damaged") from None
