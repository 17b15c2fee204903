"""Config fields carrying a one-line doc, so `qbara train --print-config` and docs/config.md read the classes."""
from __future__ import annotations

import dataclasses

__all__ = ["field_doc", "option"]

_DOC = "doc"


def option(default, doc: str):
    """A dataclass field with `default` and its one-line `doc`."""
    return dataclasses.field(default=default, metadata={_DOC: doc})


def field_doc(field: dataclasses.Field) -> str:
    """The field's one-line doc ('' when it has none: a test walks every config class for that)."""
    return field.metadata.get(_DOC, "")
