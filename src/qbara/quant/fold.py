"""Exact folding of a block-constant weight update into the float minima of an INT-quantized tensor."""
from __future__ import annotations

from torch import Tensor

from qbara.errors import QbaraError
from qbara.quant.intk import to_blocks
from qbara.quant.tensor import QuantizedTensor


def fold_problem(config, tile_rows: int, tile_cols: int) -> str | None:
    """Why an update constant on tile_rows x tile_cols tiles cannot fold into a `config` base, or None."""
    if config is None:
        return "the base layer is not quantized"
    return config.family.fold_problem(config, tile_rows, tile_cols)


def fold_block_constants(qtensor: QuantizedTensor, delta: Tensor) -> QuantizedTensor:
    """dequant(qtensor) + `delta` (constant per block) as a new INT tensor: only the minima move (rounded)."""
    config = qtensor.config
    problem = fold_problem(config, config.block_rows, config.block_size)
    if problem:
        raise QbaraError(f"cannot fold into this tensor: {problem}")
    blocks = to_blocks(delta.detach().float(), config.block_size, config.block_rows)
    first = blocks[:, 0]
    spread = (blocks - first[:, None]).abs().max()
    if spread > 1e-6 * (1.0 + first.abs().max()):
        raise QbaraError(f"the update is not constant on the quantization blocks (spread {float(spread):.3g}); "
                         f"it cannot fold exactly: merge into='dense' instead")
    tensors = dict(qtensor.tensors)
    minimum = tensors["minimum"]
    tensors["minimum"] = (minimum.float() + first.to(minimum.device)).to(minimum.dtype)
    return QuantizedTensor(config, qtensor.shape, tensors)


def fold_rounding(before: QuantizedTensor, after: QuantizedTensor, delta: Tensor) -> tuple[float, float]:
    """(‖update lost to rounding the stored minima‖², ‖update‖²) over all weights of a fold."""
    config = before.config
    wanted = to_blocks(delta.detach().float(), config.block_size, config.block_rows)[:, 0]
    moved = after.tensors["minimum"].float() - before.tensors["minimum"].float()
    wanted = wanted.to(moved.device)
    n = config.block_numel
    return float(((moved - wanted) ** 2).sum()) * n, float((wanted ** 2).sum()) * n
