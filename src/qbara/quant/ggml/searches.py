"""GGML's per-group scale searches (ggml-quants.c: make_qkx2/qkx3/q3/qx/qp_quants), vectorised: one group of
n weights per column of an (n, M) array, in the C code's float32 operations and summation order."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from qbara.quant.ggml.common import first_absmax, rdiv, seq_sum

GROUP_MAX_EPS = 1e-15  # ggml: a group with absmax below this is all zeros


def _c_float(*terms: float) -> float:
    """A float32 C expression left to right: terms[0] + terms[1] * terms[2] + terms[3]..."""
    value = np.float32(terms[0]) + np.float32(terms[1]) * np.float32(terms[2])
    for t in terms[3:]:
        value = value + np.float32(t)
    return float(value)


def _error(scale: Tensor, minimum: Tensor, codes: Tensor, x: Tensor, w: Tensor, mad: bool, work: Tensor) -> Tensor:
    """Sum of w * |scale*q + min - x| (mad) or its square, in C order."""
    diff = torch.mul(codes, scale, out=work).add_(minimum).sub_(x)
    return seq_sum((diff.abs_() if mad else diff.mul_(diff)).mul_(w))


def make_qkx2_quants(x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                     mad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Affine fit x ~ scale * q - the_min, q in [0, nmax], best of nstep + 1 grids with weighted least-squares
    refits (also make_qkx3_quants). Returns (scale (M,), the_min (M,) >= 0, codes (n, M) float)."""
    hi, lo = x.amax(dim=0), x.amin(dim=0).clamp(max=0)
    sum_w, sum_x = seq_sum(w), seq_sum(w * x)
    flat = hi == lo
    hi = torch.where(flat, lo + 1, hi)  # any span: flat sub-blocks are set at the end
    iscale = rdiv(float(nmax), hi - lo)
    scale = rdiv(1.0, iscale)
    trial, wl, work = (torch.empty_like(x) for _ in range(3))  # scratch reused by every grid
    codes = torch.sub(x, lo).mul_(iscale).round_().clamp_(0, nmax)
    best = _error(scale, lo, codes, x, w, mad, work)
    for step in range(nstep + 1):  # the grid follows the best min found so far, as in the reference
        iscale = rdiv(_c_float(rmin, rdelta, step, nmax), hi - lo)
        torch.sub(x, lo, out=trial).mul_(iscale).round_().clamp_(0, nmax)
        torch.mul(w, trial, out=wl)
        sum_l, sum_l2 = seq_sum(wl), seq_sum(torch.mul(wl, trial, out=work))
        sum_xl = seq_sum(wl.mul_(x))
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clip = this_min > 0
        this_min = torch.where(clip, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(clip, sum_xl / sum_l2, this_scale)
        error = _error(this_scale, this_min, trial, x, w, mad, work)
        better = (det > 0) & (error < best) & ~flat
        torch.where(better, trial, codes, out=codes)
        best, scale, lo = (torch.where(better, a, b) for a, b in ((error, best), (this_scale, scale), (this_min, lo)))
    codes = torch.where(flat, torch.zeros_like(codes), codes)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -lo, codes


def _descend(codes: Tensor, x: Tensor, w: Tensor, wx: Tensor, lo: int | None, hi: int, sweeps: int,
             after: bool) -> tuple[Tensor, Tensor]:
    """Coordinate descent on (n, M) int `codes` (in place) for x ~ scale * codes, moves kept when sum(w*x*l)^2 /
    sum(w*l*l) grows (`after`: sum(w*l*l) > 0 checked after the move). Returns (sum(w*x*l), sum(w*l*l))."""
    sum_lx, sum_l2 = seq_sum(wx * codes), seq_sum(w * codes * codes)
    for _ in range(sweeps):  # a pass that changes nothing leaves the state as it was, so no early exit
        for i in range(x.shape[0]):
            old = codes[i]
            slx = sum_lx - wx[i] * old
            sl2 = sum_l2 - w[i] * old * old
            new = torch.round(x[i] * sl2 / slx).clamp_(lo, hi)
            slx_new = slx + wx[i] * new
            sl2_new = sl2 + w[i] * new * new
            take = ((slx > 0) & (new != old) & ((sl2_new if after else sl2) > 0)
                    & (slx_new * slx_new * sum_l2 > sum_lx * sum_lx * sl2_new))
            codes[i] = torch.where(take, new, old)
            sum_lx = torch.where(take, slx_new, sum_lx)
            sum_l2 = torch.where(take, sl2_new, sum_l2)
    return sum_lx, sum_l2


def make_q3_quants(x: Tensor, nmax: int, sweeps: int = 5) -> tuple[Tensor, Tensor]:
    """Symmetric fit x ~ scale * (q - nmax), q in [0, 2*nmax), weights x^2, by coordinate descent from the absmax
    grid. Returns (scale (M,), codes (n, M) float)."""
    top = first_absmax(x, 0)
    zero = top.abs() < GROUP_MAX_EPS
    iscale = rdiv(float(-nmax), torch.where(zero, torch.ones_like(top), top))
    codes = torch.round(x * iscale).clamp_(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    sum_lx, sum_l2 = _descend(codes, x, w, wx, -nmax, nmax - 1, sweeps, after=True)
    scale = torch.where(sum_l2 > 0, sum_lx / sum_l2, torch.zeros_like(sum_l2))
    codes = torch.where(zero, torch.zeros_like(codes), codes + nmax)
    return torch.where(zero, torch.zeros_like(scale), scale), codes


def make_qx_quants(x: Tensor, nmax: int, w: Tensor | None = None, steps: int = 9) -> tuple[Tensor, Tensor]:
    """Symmetric fit as `make_q3_quants`, weights `w` (default x^2), best of the grids -(nmax + 0.1*i) / max,
    i = -steps..steps. Returns (scale (M,), codes (n, M) float)."""
    top = first_absmax(x, 0)
    zero = top.abs() < GROUP_MAX_EPS
    top = torch.where(zero, torch.ones_like(top), top)
    w = x * x if w is None else w
    wx = w * x

    def fit(num: float) -> tuple[Tensor, Tensor, Tensor]:
        levels = torch.round(x * rdiv(num, top)).clamp_(-nmax, nmax - 1)
        return levels, seq_sum(wx * levels), seq_sum(w * levels * levels)

    levels, sum_lx, sum_l2 = fit(float(-nmax))
    scale = torch.where(sum_l2 != 0, sum_lx / sum_l2, torch.zeros_like(sum_l2))
    best = scale * sum_lx
    for i in (*range(-steps, 0), *range(1, steps + 1)):
        trial, slx, sl2 = fit(-_c_float(nmax, 0.1, i))
        better = (sl2 > 0) & (slx * slx > best * sl2)
        levels = torch.where(better, trial, levels)
        scale = torch.where(better, slx / sl2, scale)
        best = torch.where(better, scale * slx, best)
    codes = torch.where(zero, torch.zeros_like(levels), levels + nmax)
    return torch.where(zero, torch.zeros_like(scale), scale), codes


def make_qp_quants(x: Tensor, nmax: int, w: Tensor, sweeps: int = 5) -> tuple[Tensor, Tensor]:
    """Fit of non-negative (n, M) `x` to scale * q, q in [0, nmax], weighted: best of 9 grids, then coordinate
    descent. Returns (scale (M,), codes (n, M) float)."""
    top = x.amax(dim=0).clamp(min=0)
    zero = top < GROUP_MAX_EPS
    top = torch.where(zero, torch.ones_like(top), top)
    iscale = rdiv(float(nmax), top)
    scale = rdiv(1.0, iscale)
    diff = x - scale * torch.round(iscale * x)  # the first grid's codes are not clamped (they cannot pass nmax)
    best = seq_sum(w * diff * diff)
    for i in (-4, -3, -2, -1, 1, 2, 3, 4):
        trial = rdiv(_c_float(0.0, 0.1, i, nmax), top)
        diff = x - rdiv(1.0, trial) * torch.round(trial * x).clamp_(max=nmax)
        error = seq_sum(w * diff * diff)
        better = error < best
        best = torch.where(better, error, best)
        iscale = torch.where(better, trial, iscale)
    codes = torch.round(iscale * x).clamp_(max=nmax)
    sum_lx, sum_l2 = _descend(codes, x, w, w * x, None, nmax, sweeps, after=False)
    scale = torch.where(sum_l2 > 0, sum_lx / sum_l2, torch.zeros_like(sum_l2))
    codes = torch.where(zero, torch.zeros_like(codes), codes)
    return torch.where(zero, torch.zeros_like(scale), scale), codes
