"""The one user-facing error type: its message names the problem and the fix."""


class QbaraError(ValueError):
    """Bad input or an impossible request. Caught by the CLI and printed without a traceback."""


def strict_from_dict(cls, data: dict):
    """Build dataclass `cls` from `data`, refusing unknown keys with the list of valid ones."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise QbaraError(f"unknown {cls.__name__} keys {sorted(unknown)}: valid keys are {sorted(known)}")
    return cls(**data)
