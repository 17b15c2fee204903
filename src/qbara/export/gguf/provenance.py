"""`general.*` provenance metadata: the exported model's name, its base model, and what was merged into it."""
from __future__ import annotations

import re
from pathlib import Path

from gguf import GGUFValueType
from gguf.constants import Keys

from qbara.export.gguf.checks import ARCH

# Set by the writer for this file (general.quantized_by marks the files qbara wrote).
_WRITER_GENERAL = ("general.name", "general.type", "general.architecture", "general.file_type",
                  "general.quantization_version", "general.alignment", "general.quantized_by")
# Describe the source model: recorded as general.base_model.0.* (author and organization also as the exported
# model's; the SOURCE_ONLY ones name that very file).
_SOURCE_TO_BASE = {"general.author": "author", "general.organization": "organization", "general.version": "version",
                  "general.description": "description", "general.url": "url", "general.doi": "doi",
                  "general.uuid": "uuid", "general.repo_url": "repo_url"}
_SOURCE_ONLY = ("general.version", "general.description", "general.url", "general.doi", "general.uuid",
               "general.repo_url")
# Shapes that must agree before a GGUF's general.* metadata is taken to describe the exported model.
_SHAPE_KEYS = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
              "attention.head_count_kv")


def model_name(model, name: str | None, base_model: str | None = None, what: str = "qbara export") -> str:
    """general.name: `name`, else the model's source folder or `base_model`, marked "(`what`)"."""
    if name:
        return name
    source = getattr(model.config, "_name_or_path", "") or base_model or ""
    return f"{Path(source).name or source or 'qbara-model'} ({what})"


def _general_keys():
    """gguf-py's standard `general.*` keys: (exact names, patterns for the `{id}` ones)."""
    names = [v for k, v in vars(Keys.General).items() if k.isupper() and isinstance(v, str)]
    exact = {n for n in names if "{id}" not in n}
    patterns = [re.compile(re.escape(n).replace(re.escape("{id}"), r"\d+") + r"\Z") for n in names if "{id}" in n]
    return exact, patterns


def _field(reader, key):
    fld = reader.fields[key]
    vtype = fld.types[0]
    return fld.contents(), vtype, (fld.types[-1] if vtype == GGUFValueType.ARRAY else None)


def same_model(reader, config, vocab_size: int, arch: str = ARCH) -> bool:
    """True when the GGUF in `reader` holds a model of architecture `arch` with `config`'s shape and vocabulary
    (only then is its general.* metadata carried over)."""
    fields = reader.fields
    try:
        if fields["general.architecture"].contents() != arch:
            return False
        want = (config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                config.num_attention_heads, config.num_key_value_heads)
        have = tuple(int(fields[f"{arch}.{k}"].contents()) for k in _SHAPE_KEYS)
        tokens = len(fields["tokenizer.ggml.tokens"].contents())
    except (KeyError, AttributeError, TypeError, ValueError):
        return False
    return have == tuple(int(w) for w in want) and tokens == vocab_size


def _source_general(reader) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(general.* keys carried over as the exported model's, attributes of the base model) from a source GGUF."""
    out: dict[str, tuple] = {}
    base: dict[str, tuple] = {}
    exact, patterns = _general_keys()
    for key in reader.fields:
        if key in _WRITER_GENERAL or not (key in exact or any(p.match(key) for p in patterns)):
            continue
        if key.startswith(("general.base_model.", "general.source.")):
            continue
        if key in _SOURCE_TO_BASE:
            base[_SOURCE_TO_BASE[key]] = _field(reader, key)
        if key not in _SOURCE_ONLY:
            out[key] = _field(reader, key)
    for attr in ("url", "repo_url", "doi", "uuid"):  # the source file's own source, when it names none
        if attr not in base and f"general.source.{attr}" in reader.fields:
            base[attr] = _field(reader, f"general.source.{attr}")
    return out, base


def base_model_fields(name: str, base: dict[str, tuple] | None = None) -> dict[str, tuple]:
    """general.base_model.count = 1 and general.base_model.0.{name, `base`'s attributes}."""
    out = {"general.base_model.count": (1, GGUFValueType.UINT32, None),
           "general.base_model.0.name": (str(name), GGUFValueType.STRING, None)}
    for attr, value in (base or {}).items():
        out[f"general.base_model.0.{attr}"] = value
    return out


def provenance_fields(source, base_model: str | None, adapter: str | None, *, config=None,
                      vocab_size: int | None = None, arch: str = ARCH) -> dict[str, tuple]:
    """general.* metadata for the exported file: key -> (value, GGUF type, array item type). A `source` GGUF of
    this very model (`same_model`) gives its general.* keys, those naming that file as general.base_model.0.*."""
    out: dict[str, tuple] = {}
    base: dict[str, tuple] = {}
    reader = None
    if source is not None and (config is None or same_model(source[1], config, vocab_size, arch)):
        reader = source[1]
        out, base = _source_general(reader)
    name = base_model
    if name is None and reader is not None and "general.name" in reader.fields:
        name = str(reader.fields["general.name"].contents())
    if name is not None:
        out.update(base_model_fields(name, base))
    if name is not None or adapter:
        what = " with ".join(x for x in (f"base model {name}" if name is not None else "",
                                         f"the adapter {adapter} merged" if adapter else "") if x)
        out["general.description"] = (f"{what}; exported by qbara", GGUFValueType.STRING, None)
    return out
