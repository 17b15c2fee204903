"""GPTQ: quantize a weight column by column, each rounding error spread over the columns not yet quantized.

"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers" (arXiv 2210.17323):
minimise ||(W - Ŵ) X||² greedily, H = 2 X Xᵀ; row j of the upper Cholesky factor U of H⁻¹ gives column j's
update δ_F = -(w_j - q_j) / U_jj · U_{j,F}, applied lazily per block of columns. The result is qbara's INT-k
layout, each group's grid set from its error-updated weights when GPTQ reaches its first column."""
from __future__ import annotations

import torch
from torch import Tensor

from qbara.errors import QbaraError
from qbara.quant.config import QuantConfig
from qbara.quant.intk import quantize_int
from qbara.quant.packing import pack_bits
from qbara.quant.tensor import QuantizedTensor

__all__ = ["DEFAULT_BLOCK_COLUMNS", "DEFAULT_DAMP", "gptq_quantize", "hessian_accumulate", "output_error"]

DEFAULT_DAMP = 0.01  # λ = 1 % of the mean diagonal of H (the paper's dampening)
DEFAULT_BLOCK_COLUMNS = 128  # columns per lazy-update block (the paper's B = 128)


def hessian_accumulate(hessian: Tensor | None, count: int, inputs: Tensor) -> tuple[Tensor, int]:
    """Add inputs (..., d_in) to the running H = 2/n Σ x xᵀ (fp32, in place; start from (None, 0)); returns (H, n)."""
    x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
    if hessian is None:
        hessian = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    if hessian.shape != (x.shape[1], x.shape[1]):
        raise QbaraError(f"inputs have {x.shape[1]} features but the Hessian is {tuple(hessian.shape)}; "
                         f"accumulate each layer's inputs into its own Hessian")
    total = count + x.shape[0]
    if total:
        hessian.mul_(count / total).addmm_(x.t(), x, alpha=2.0 / total)
    return hessian, total


def output_error(weight: Tensor, approx: Tensor, hessian: Tensor) -> float:
    """Mean squared output error per calibration sample: tr(ΔW H ΔWᵀ) / 2 for H = 2/n Σ x xᵀ."""
    delta = (weight.float() - approx.float()).to(hessian.device)
    return float(((delta @ hessian) * delta).sum()) / 2


def gptq_quantize(weight: Tensor, hessian: Tensor, config: QuantConfig, *, damp: float = DEFAULT_DAMP,
                  block_columns: int = DEFAULT_BLOCK_COLUMNS, act_order: bool = False,
                  name: str = "weight") -> QuantizedTensor:
    """GPTQ-quantize a (d_out, d_in) weight given its inputs' Hessian H (`hessian_accumulate`) into a QuantizedTensor.
    config: INT with 1 x G groups (NF, 2-D tiles refused). damp: fraction of H's mean diagonal added to it.
    block_columns: lazy-update block, rounded to a multiple of G. act_order: visit columns by decreasing H_jj,
    every group's grid fixed from the unmodified weight first."""
    _check_config(config, name)
    _check_inputs(weight, hessian, config, name, damp, block_columns)
    w = weight.detach().float().clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else None
    static = _group_params(w, config) if act_order else None
    if order is not None:
        w, h = w[:, order], h[order][:, order]
    u = _inverse_cholesky(_dampened(h, damp), name)
    codes, scale, minimum = _quantize_columns(w, u, config, _block_width(config.block_size, block_columns),
                                              order, static)
    return QuantizedTensor(config, (int(weight.shape[0]), int(weight.shape[1])),
                           {"codes": pack_bits(codes.reshape(-1), config.bits), "scale": scale.reshape(-1),
                            "minimum": minimum.reshape(-1)})


def _check_config(config: QuantConfig, name: str) -> None:
    if not isinstance(config, QuantConfig):
        raise QbaraError(f"{name}: GPTQ needs a QuantConfig, got {type(config).__name__}")
    if not config.family.takes_gptq:
        raise QbaraError(f"{name}: GPTQ produces INT formats only, not {config.format}; use int2/int3/int4/int5/int8 "
                         f"(e.g. QuantConfig('int4', 32)), or quantize NF formats with qbara.quantize")
    if config.block_rows != 1:
        raise QbaraError(f"{name}: GPTQ quantizes 1 x G groups along a row, not {config.block_rows}-row tiles; "
                         f"use block_rows=1, or quantize 2-D tiles with qbara.quantize")


def _check_inputs(weight: Tensor, hessian: Tensor, config: QuantConfig, name: str, damp: float,
                  block_columns: int) -> None:
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise QbaraError(f"{name}: GPTQ needs a floating weight tensor, got {getattr(weight, 'dtype', weight)!r}")
    config.check_shape(tuple(weight.shape), name)
    d_in = weight.shape[1]
    if not isinstance(hessian, Tensor) or tuple(hessian.shape) != (d_in, d_in):
        raise QbaraError(f"{name}: the Hessian must be ({d_in}, {d_in}) for a weight of shape "
                         f"{tuple(weight.shape)}, got {tuple(getattr(hessian, 'shape', ()))}; accumulate it from "
                         f"this layer's inputs with hessian_accumulate")
    if not bool(torch.isfinite(weight).all()) or not bool(torch.isfinite(hessian).all()):
        raise QbaraError(f"{name}: the weight or its Hessian holds NaN or Inf; fix the checkpoint or the "
                         f"calibration inputs")
    if not 0 < damp < 1 or not isinstance(block_columns, int) or block_columns < 1:
        raise QbaraError(f"{name}: need 0 < damp < 1 and block_columns >= 1, got damp={damp}, "
                         f"block_columns={block_columns}")


def _dampened(h: Tensor, damp: float) -> Tensor:
    """H with dead inputs (H_jj = 0) given H_jj = 1, then damp · mean diag added to the diagonal."""
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0
    diag += damp * float(diag.mean())
    return h


def _inverse_cholesky(h: Tensor, name: str) -> Tensor:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ U)."""
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if int(info):
        raise QbaraError(f"{name}: the dampened Hessian is not positive definite; raise damp (e.g. 0.1) or use "
                         f"more calibration tokens")
    return upper


def _block_width(group: int, block_columns: int) -> int:
    return group * max(1, block_columns // group)


def _group_params(w: Tensor, config: QuantConfig) -> tuple[Tensor, Tensor]:
    """Scale (fp16) and minimum (stored dtype) of every 1 x G group of `w`, (d_out, d_in / G), as `quantize_int`."""
    minimum_dtype = torch.float32 if config.minimum_dtype == "fp32" else torch.float16
    _, scale, minimum = quantize_int(w, config.bits, config.block_size, 1, minimum_dtype)
    return scale.reshape(w.shape[0], -1), minimum.reshape(w.shape[0], -1)


def _grid(scale: Tensor, minimum: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(s, divisor, m) in fp32; divisor +inf where s = 0, so those rows get code 0 as in `quantize_int`."""
    s = scale.float()
    return s, torch.where(s > 0, s, torch.full_like(s, float("inf"))), minimum.float()


def _quantize_columns(w: Tensor, u: Tensor, config: QuantConfig, width: int, order: Tensor | None,
                      static: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ's loop over the (possibly permuted) columns in blocks of `width`, on Wᵀ so columns are contiguous.
    Returns (codes uint8 (d_out, d_in) in the original order, scale, minimum)."""
    d_out, d_in = w.shape
    group, qmax = config.block_size, 2 ** config.bits - 1
    if static is not None:
        scale, minimum = static
    else:
        scale = torch.empty(d_out, d_in // group, dtype=torch.float16, device=w.device)
        minimum = torch.empty(d_out, d_in // group, dtype=torch.float32 if config.minimum_dtype == "fp32"
                              else torch.float16, device=w.device)
    original = order.tolist() if order is not None else list(range(d_in))
    pivots = torch.diagonal(u).tolist()
    w_t = w.t().contiguous()
    codes_t = torch.empty(d_in, d_out, dtype=torch.uint8, device=w.device)
    for start in range(0, d_in, width):
        stop = min(start + width, d_in)
        block, errors = w_t[start:stop], torch.empty(stop - start, d_out, device=w.device)
        for j in range(stop - start):
            column, col = original[start + j], block[j]
            if static is None and j % group == 0:  # a group starts: its grid from the weights as they are now
                g = column // group
                scale[:, g], minimum[:, g] = (t[:, 0] for t in _group_params(block[j:j + group].t(), config))
            if static is not None or j % group == 0:
                s, divisor, m = _grid(scale[:, column // group], minimum[:, column // group])
            q = torch.round((col - m) / divisor).clamp_(0, qmax)  # the rounding of quantize_int
            codes_t[column] = q
            torch.sub(col, torch.addcmul(m, q, s), out=errors[j]).div_(pivots[start + j])
            block[j + 1:].addr_(u[start + j, start + j + 1:stop], errors[j], alpha=-1)
        w_t[stop:].sub_(u[start:stop, stop:].t() @ errors)
    return codes_t.t(), scale, minimum
