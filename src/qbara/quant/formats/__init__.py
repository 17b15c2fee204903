"""The format registry: one `QuantFormat` per family; add one with a line here or `register(family)`."""
from __future__ import annotations

from collections.abc import Iterable

from qbara.errors import QbaraError
from qbara.quant.formats.base import QuantFormat
from qbara.quant.formats.ggml import GGML
from qbara.quant.formats.intk import INT
from qbara.quant.formats.nf import NF

FAMILIES: dict[str, QuantFormat] = {
    "nf": NF,
    "int": INT,
    "gguf": GGML,
}
_BY_FORMAT: dict[str, QuantFormat] = {}


def _index() -> None:
    _BY_FORMAT.clear()
    _BY_FORMAT.update({fmt: family for family in FAMILIES.values() for fmt in family.formats})


def register(family: QuantFormat) -> QuantFormat:
    """Add `family` (or replace the one of its name) at run time: its format names become QuantConfig formats."""
    FAMILIES[family.name] = family
    _index()
    return family


def unregister(name: str) -> None:
    FAMILIES.pop(name)
    _index()


def family_of(format_name: str) -> QuantFormat:
    """The family owning `format_name`; a QbaraError listing the formats for an unknown one."""
    family = _BY_FORMAT.get(format_name)
    if family is None:
        raise QbaraError(f"unknown quantization format {format_name!r}: choose one of {', '.join(_BY_FORMAT)}")
    return family


def check_takes_importance(configs: Iterable, hint: str = "") -> None:
    """Refuse an importance when no config in `configs` takes one (only gguf:* weight their rounding)."""
    if not any(c.family.takes_importance for c in configs):
        raise QbaraError(f"an importance weights the rounding of gguf:* formats only, and none of the configs is "
                         f"one{hint}; drop importance= or choose gguf:* configs (qbara.lq.gguf_configs())")


_index()
FORMATS: tuple[str, ...] = tuple(_BY_FORMAT)  # the built-in formats, family by family

__all__ = ["FAMILIES", "FORMATS", "check_takes_importance", "family_of", "register", "unregister"]
