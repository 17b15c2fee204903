"""Checks on tensors read from files: the right dtype (never cast silently), the right shape, finite values."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from qbara.errors import QbaraError
from qbara.validate import regular_file

__all__ = ["ADAPTER_LIMIT", "check_digest", "check_model_values", "check_tensor", "read_safetensors",
           "safetensors_metadata", "tensors_digest"]


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, with one clear error for a damaged file."""
    regular_file(path, "safetensors file")  # not a device, pipe or folder a symlink points to
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise QbaraError(f"{path}: not a readable safetensors file ({err}); the file is damaged, write it "
                         f"again") from None


def safetensors_metadata(path, what: str) -> dict[str, str]:
    """The string metadata of a safetensors file, with one clear error naming `what` it should be."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise QbaraError(f"cannot read the {what} {str(path)!r}: {exc}") from None


# No trained weight of a working model comes near these magnitudes; a value beyond them is damage (a flipped
# exponent bit, a diverged run) that would only show later as an infinite loss.
ADAPTER_LIMIT = 1e4
_WEIGHT_LIMIT = 1e5


def check_tensor(tensor: torch.Tensor, what: str, *, shape=None, dtype: torch.dtype | None = None,
                 floating: bool = True, limit: float = _WEIGHT_LIMIT) -> None:
    """Refuse a tensor of the wrong shape or dtype, or holding NaN/Inf or values beyond ±limit.
    dtype: the exact dtype required; otherwise `floating` requires some float dtype (never a silent cast)."""
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise QbaraError(f"{what}: shape {tuple(tensor.shape)}, expected {tuple(shape)}; the file does not "
                         f"fit this model")
    if dtype is not None and tensor.dtype != dtype:
        raise QbaraError(f"{what}: dtype {tensor.dtype}, expected {dtype}; the file was not written by qbara "
                         f"for this model or is damaged")
    if dtype is None and floating and not tensor.is_floating_point():
        raise QbaraError(f"{what}: dtype {tensor.dtype} is not a float type; refusing to cast it (the file is "
                         f"damaged or not written by qbara)")
    if not tensor.is_floating_point() or not tensor.numel():
        return
    low, high = (float(v) for v in torch.aminmax(tensor))  # one pass, no temporary; NaN propagates
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = int((~torch.isfinite(tensor)).sum())
        raise QbaraError(f"{what}: {bad} of {tensor.numel()} values are NaN or infinite; the file is damaged "
                         f"(or training diverged): use an earlier checkpoint")
    if max(-low, high) > limit:
        raise QbaraError(f"{what}: values up to {max(-low, high):.3g}, beyond ±{limit:g}; the file is "
                         f"damaged (or training diverged): use an earlier checkpoint")


def check_model_values(model: torch.nn.Module, source) -> None:
    """Refuse a loaded model any of whose float parameters or buffers hold NaN/Inf or absurd values."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        check_tensor(tensor.detach(), f"{Path(str(source))}: {name}", floating=False)


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, recorded on write and compared on read."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # hashed in place, no copy
    return digest.hexdigest()


def check_digest(state: dict[str, torch.Tensor], recorded: str | None, path, where: str) -> None:
    """Refuse `state` (read from `path`) if its digest differs from the one `where` recorded."""
    if recorded is not None and tensors_digest(state) != recorded:
        raise QbaraError(f"{path}: the tensors differ from those written (swapped, replaced or damaged since; "
                         f"{where} records their SHA-256); write the file again, or, if you changed it on purpose, "
                         f"delete weights_sha256 from {where}")
