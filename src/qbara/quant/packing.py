"""Bit packing of unsigned integer codes into uint8 buffers (MSB first, bitsandbytes' nibble order)."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

_SUPPORTED_BITS = (2, 3, 4, 5, 8)


def packed_nbytes(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Codes in [0, 2**bits) -> flat uint8, first code in the most significant bits (4-bit: bitsandbytes' layout)."""
    _check_bits(bits)
    flat = codes.reshape(-1)
    n = flat.numel()
    if bits == 8:
        return flat.to(torch.uint8).clone()
    per_byte = 8 // bits if 8 % bits == 0 else None
    if per_byte is not None:
        flat = torch.nn.functional.pad(flat.to(torch.uint8), (0, (-n) % per_byte))
        shifts = torch.arange(per_byte - 1, -1, -1, device=flat.device, dtype=torch.uint8) * bits
        groups = flat.view(-1, per_byte) << shifts
        packed = groups[:, 0]
        for j in range(1, per_byte):
            packed = packed | groups[:, j]
        return packed
    # Widths that do not divide 8 (3, 5 bits): 8 codes -> one `bits`-byte word.
    flat = torch.nn.functional.pad(flat.to(torch.int64), (0, (-n) % 8))
    code_shifts = torch.arange(7, -1, -1, device=flat.device, dtype=torch.int64) * bits
    words = (flat.view(-1, 8) << code_shifts).sum(dim=1)
    byte_shifts = torch.arange(bits - 1, -1, -1, device=flat.device, dtype=torch.int64) * 8
    packed = ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return packed[: packed_nbytes(n, bits)].contiguous()


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of `pack_bits`: the first `numel` codes as uint8."""
    _check_bits(bits)
    packed = packed.reshape(-1)
    if bits == 8:
        return packed[:numel]
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = torch.arange(per_byte - 1, -1, -1, device=packed.device, dtype=torch.uint8) * bits
        mask = (1 << bits) - 1
        codes = (packed[:, None] >> shifts) & mask
        return codes.reshape(-1)[:numel]
    padded = torch.nn.functional.pad(packed, (0, (-packed.numel()) % bits)).to(torch.int64)
    byte_shifts = torch.arange(bits - 1, -1, -1, device=packed.device, dtype=torch.int64) * 8
    words = (padded.view(-1, bits) << byte_shifts).sum(dim=1)
    code_shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.int64) * bits
    codes = (words[:, None] >> code_shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)


@functools.lru_cache(maxsize=None)
def _byte_codes(bits: int, device: torch.device) -> Tensor:
    """(256, 8 // bits) int64: the codes packed in each possible byte, in packing order."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte - 1, -1, -1, dtype=torch.int64) * bits
    return ((torch.arange(256, dtype=torch.int64)[:, None] >> shifts) & ((1 << bits) - 1)).to(device)


def unpack_lookup(packed: Tensor, bits: int, numel: int, values: Tensor, out: Tensor | None = None) -> Tensor:
    """values[code] (`values`: 2**bits entries) for the first `numel` packed codes, one table lookup per byte for
    2/4/8 bits. `out` (numel a whole number of bytes): a flat buffer to write into."""
    _check_bits(bits)
    if 8 % bits:
        return values[unpack_bits(packed, bits, numel).long()]
    table = values[_byte_codes(bits, values.device)]  # (256, codes per byte)
    if out is not None and numel % (8 // bits) == 0:
        index = packed.reshape(-1)[: numel // (8 // bits)].int()
        return torch.index_select(table, 0, index, out=out.view(-1, 8 // bits)).reshape(-1)
    return torch.nn.functional.embedding(packed.reshape(-1).int(), table).reshape(-1)[:numel]


def check_out(out: Tensor | None, dtype: torch.dtype) -> None:
    """Refuse an `out` buffer unless it and `dtype` are fp32 (dequantizers compute in fp32)."""
    if out is not None and (out.dtype != torch.float32 or dtype != torch.float32):
        raise ValueError(f"out= takes an fp32 buffer with dtype fp32 (got a {out.dtype} buffer, dtype {dtype})")


def _check_bits(bits: int) -> None:
    if bits not in _SUPPORTED_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes: supported widths are {_SUPPORTED_BITS}")
