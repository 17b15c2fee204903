"""The one user-facing error type: its message names the problem and the fix."""
import dataclasses

__all__ = ["QbaraError", "check_types", "strict_from_dict"]


class QbaraError(ValueError):
    """Bad input or an impossible request. Caught by the CLI and printed without a traceback."""


def strict_from_dict(cls, data: dict):
    """Build dataclass `cls` from `data`, refusing unknown keys with the list of valid ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise QbaraError(f"unknown {cls.__name__} keys {sorted(unknown)}: valid keys are {sorted(known)}")
    return cls(**data)


def check_types(obj, fields: dict) -> None:
    """Refuse a dataclass field whose value is not of its type (`fields`: name -> (types, allow None));
    bool is never an int or float, an int is a valid float."""
    for name, (types, optional) in fields.items():
        value = getattr(obj, name)
        if value is None and optional:
            continue
        ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
        if not ok:
            wanted = " or ".join(t.__name__ for t in types) + (" or null" if optional else "")
            raise QbaraError(f"{type(obj).__name__}.{name} must be {wanted}, got {value!r} "
                             f"({type(value).__name__})")
