"""The pooling and repetition maps shared by QA-LoRA, Q-BaRA and QA-HiRA."""
from __future__ import annotations

from torch import Tensor, nn

from qbara.errors import QbaraError


def pool_features(x: Tensor, factor: int) -> Tensor:
    """P_factor: average each run of `factor` adjacent features of the last dimension (d -> d / factor)."""
    if factor == 1:
        return x
    return x.unflatten(-1, (x.shape[-1] // factor, factor)).mean(dim=-1)


def repeat_features(y: Tensor, factor: int) -> Tensor:
    """R_factor: repeat each feature `factor` times, interleaved (d / factor -> d)."""
    if factor == 1:
        return y
    return y.repeat_interleave(factor, dim=-1)


def expand_tiles(matrix: Tensor, rows: int, cols: int) -> Tensor:
    """Dense matrix whose (o, i) entry is matrix[o // rows, i // cols]."""
    return matrix.repeat_interleave(rows, dim=0).repeat_interleave(cols, dim=1)


def input_pooling(base: nn.Module, config, name: str, refusal: str) -> int:
    """`config.pool_in`, else the quantized base's group size; `refusal` (the method's words) when it has none."""
    quant = getattr(base, "quant_config", None)
    pool_in = config.pool_in or (quant.block_size if quant is not None else None)
    if pool_in is None:
        raise QbaraError(f"{name}: {refusal}")
    return pool_in
