"""LoftQ initialisation (Li et al., "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models",
arXiv 2310.08659), LQ-LoRA's baseline: from zero factors, alternate `iters` times Q <- quantize(W - L1 L2),
L1 L2 <- SVD_r(W - Q), and keep the last iterate. The SVD is exact by default, as in LoftQ: the quantization
error it factors has a flat spectrum, where a randomized SVD misses much of the top subspace."""
from __future__ import annotations

import torch
from torch import Tensor

from qbara.errors import QbaraError
from qbara.lq.decompose import (
    Decomposition,
    check_decompose_inputs,
    low_rank_factors,
    quantize_step,
    rounding_importance_of,
    weighted_error,
)
from qbara.lq.parallel import check_cancelled
from qbara.quant.config import QuantConfig
from qbara.quant.tensor import quantize


def loftq(W: Tensor, quant_config: QuantConfig, rank: int = 64, iters: int = 1, *, exact_svd: bool = True,
          oversample: int = 10, power_iters: int = 2, seed: int = 0, name: str = "weight",
          importance: Tensor | None = None) -> Decomposition:
    """LoftQ's W ≈ dequant(Q) + L1 @ L2 after `iters` alternations; `best_iter` is the last, whether or not an
    earlier one erred less. exact_svd=False uses the randomized SVD."""
    if not isinstance(iters, int) or iters < 1:
        raise QbaraError(f"{name}: LoftQ needs iters >= 1 alternations, got {iters!r}")
    check_decompose_inputs(W, quant_config, rank, iters, None, name)
    importance = rounding_importance_of(quant_config, importance, tuple(W.shape), name)
    quant_config.check_shape(tuple(W.shape), name)
    W = W.detach().to(torch.float32)
    if not torch.isfinite(W).all():
        raise QbaraError(f"{name}: weight contains NaN or Inf; fix the checkpoint before quantizing")
    generator = torch.Generator(device=W.device).manual_seed(int(seed))
    step = quantize_step(quant_config, name, importance)
    m, n = W.shape
    if exact_svd:
        oversample = min(m, n)  # low_rank_factors switches to the exact SVD
    L1, L2 = W.new_zeros(m, rank), W.new_zeros(rank, n)
    errors: list[float] = []
    R = W
    for _ in range(iters):
        check_cancelled()  # a Ctrl-C'd run_per_matrix stops here
        R = W - L1 @ L2
        Q, _ = step(R)
        L1, L2, _ = low_rank_factors(W - Q, rank, None, oversample, power_iters, generator)
        errors.append(weighted_error(W - Q - L1 @ L2))
    return Decomposition(quantize(R, quant_config, name, importance), L1, L2, errors, iters - 1)
