"""LQ-LoRA's bit allocation (arXiv 2311.12023) as a 0/1 integer linear program, solved with HiGHS
(`scipy.optimize.milp`):

    minimise Σ_i Σ_c C[i,c] x[i,c]  s.t.  Σ_i Σ_c numel_i · bits[c] · x[i,c] <= budget · Σ_i numel_i,
    Σ_c x[i,c] = 1 for every matrix i, x binary.

Exact reductions first: unusable configs (non-finite cost), reduced-cost fixing against a Lagrangian bound and a
greedy incumbent, and dominated configs. A file budget (fixed_bits F, total_params T) is the same problem at
(budget · T - F) / Σ numel_i bits/param over the matrices (`matrix_budget`)."""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys

import numpy as np

from qbara.errors import QbaraError
from qbara.lq.configs import pareto_front

__all__ = ["allocate", "budget_range", "allocation_bits", "matrix_budget"]

_MIP_REL_GAP = 1e-9


def _as_arrays(costs, bits, numels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    costs = np.asarray(_numpy(costs), dtype=np.float64)
    if costs.ndim != 2 or costs.shape[0] == 0 or costs.shape[1] == 0:
        raise QbaraError(f"costs must be a non-empty (matrices x configs) table, got shape {costs.shape}")
    n, m = costs.shape
    bits = np.asarray(_numpy(bits), dtype=np.float64)
    if bits.shape == (m,):
        bits = np.broadcast_to(bits, (n, m))
    if bits.shape != (n, m):
        raise QbaraError(f"bits must have one entry per config ({m}) or per (matrix, config) {(n, m)}, got "
                         f"shape {bits.shape}")
    numels = np.asarray(_numpy(numels), dtype=np.float64).reshape(-1)
    if numels.shape != (n,):
        raise QbaraError(f"numels must have one entry per matrix ({n}), got shape {numels.shape}")
    if not np.all(np.isfinite(bits)) or np.any(bits <= 0) or np.any(numels <= 0):
        raise QbaraError("bits and numels must be positive and finite")
    if np.any(np.isnan(costs)) or np.any(costs < 0):
        raise QbaraError("costs must be non-negative (use +inf for a config a matrix cannot use)")
    empty = [i for i in range(n) if not np.isfinite(costs[i]).any()]
    if empty:
        raise QbaraError(f"matrices {empty[:5]} have no usable config (every cost is infinite); add configs "
                         f"whose block size divides their input features, or leave them out")
    return costs, bits, numels


def _numpy(x):
    if hasattr(x, "detach"):
        return x.detach().cpu().double().numpy()
    return x


def _check_file_terms(numels: np.ndarray, fixed_bits, total_params) -> tuple[float, float]:
    """(F, T) as floats, checked: F >= 0 finite, T >= Σ numel (default Σ numel)."""
    matrices = float(numels.sum())
    try:
        fixed = float(fixed_bits)
        total = matrices if total_params is None else float(total_params)
    except (TypeError, ValueError):
        raise QbaraError(f"fixed_bits and total_params must be numbers, got {fixed_bits!r} and "
                         f"{total_params!r}") from None
    if not math.isfinite(fixed) or fixed < 0:
        raise QbaraError(f"fixed_bits must be a finite number >= 0 (bits the file stores besides the "
                         f"allocated matrices), got {fixed_bits!r}")
    if not math.isfinite(total) or total < matrices * (1 - 1e-12):
        raise QbaraError(f"total_params ({total_params!r}) must count the whole model, at least the "
                         f"{int(matrices)} parameters of the allocated matrices; pass the model's parameter count")
    return fixed, total


def matrix_budget(budget: float, numels, fixed_bits: float = 0.0, total_params: float | None = None) -> float:
    """The bits/param a file budget leaves the allocated matrices: (budget·T - F) / Σ numel_i."""
    numels = np.asarray(_numpy(numels), dtype=np.float64).reshape(-1)
    fixed, total = _check_file_terms(numels, fixed_bits, total_params)
    if fixed == 0 and total_params is None:
        return float(budget)
    return (float(budget) * total - fixed) / float(numels.sum())


def _file_budget(matrix_bits: float, numels: np.ndarray, fixed: float, total: float) -> float:
    """The inverse of `matrix_budget`: file bits/param of matrices at `matrix_bits` bits/param."""
    return (matrix_bits * float(numels.sum()) + fixed) / total


def budget_range(costs, bits, numels, *, fixed_bits: float = 0.0, total_params: float | None = None
                 ) -> tuple[float, float]:
    """(smallest feasible, largest useful) budget in bits per parameter: every matrix at its cheapest usable
    config, and at its lowest-error one. With `fixed_bits` / `total_params` both are file budgets."""
    costs, bits, numels = _as_arrays(costs, bits, numels)
    fixed, total_all = _check_file_terms(numels, fixed_bits, total_params)
    low, high = _matrix_range(costs, bits, numels)
    if fixed == 0 and total_params is None:
        return low, high
    return _file_budget(low, numels, fixed, total_all), _file_budget(high, numels, fixed, total_all)


def _matrix_range(costs: np.ndarray, bits: np.ndarray, numels: np.ndarray) -> tuple[float, float]:
    """`budget_range` over the matrices only, on checked arrays."""
    total = numels.sum()
    finite = np.isfinite(costs)
    cheapest = np.where(finite, bits, np.inf).min(axis=1)
    low = float((numels * cheapest).sum() / total)
    best_cost = np.where(finite, costs, np.inf).min(axis=1, keepdims=True)
    at_best = np.where(finite & (costs <= best_cost), bits, np.inf).min(axis=1)
    high = float((numels * at_best).sum() / total)
    return low, high


def allocation_bits(choice, bits, numels) -> float:
    """Bits per parameter of an allocation (one config index per matrix)."""
    bits = np.asarray(_numpy(bits), dtype=np.float64)
    numels = np.asarray(_numpy(numels), dtype=np.float64).reshape(-1)
    per = bits[list(choice)] if bits.ndim == 1 else bits[np.arange(len(choice)), list(choice)]
    return float((numels * per).sum() / numels.sum())


def _flush_c_stdout() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def _quiet_stdout():
    """Silence C-level writes to stdout (some HiGHS builds print debug lines from inside the MIP solver)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
        yield
    finally:
        _flush_c_stdout()
        os.dup2(saved, fd)
        os.close(saved)


def _lagrangian_choice(costs: np.ndarray, weights: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Per matrix, the config minimising cost + lam * weight (ties: the lighter); and that minimum."""
    with np.errstate(invalid="ignore"):
        value = costs + lam * weights
    value = np.where(np.isfinite(costs), value, np.inf)
    best = value.min(axis=1, keepdims=True)
    tied = np.where(value <= best + 1e-12 * np.abs(best), weights, np.inf)
    return tied.argmin(axis=1), best[:, 0]


def _improve(costs: np.ndarray, weights: np.ndarray, budget: float, choice: np.ndarray,
             max_steps: int = 10_000) -> np.ndarray:
    """Greedy: while some single change lowers the cost and fits the budget, make the best one."""
    rows = np.arange(costs.shape[0])
    choice = choice.copy()
    for _ in range(max_steps):
        left = budget - weights[rows, choice].sum()
        d_cost = costs - costs[rows, choice][:, None]
        d_weight = weights - weights[rows, choice][:, None]
        ok = np.isfinite(costs) & (d_weight <= left) & (d_cost < 0)
        if not ok.any():
            break
        gain = np.where(ok, -d_cost, -np.inf)
        i, c = np.unravel_index(np.argmax(gain), gain.shape)
        choice[i] = c
    return choice


def _repair(costs: np.ndarray, weights: np.ndarray, budget: float, choice: np.ndarray,
            max_steps: int = 10_000) -> np.ndarray | None:
    """Greedy: while over budget, make the lighter change that costs least per bit saved."""
    rows = np.arange(costs.shape[0])
    choice = choice.copy()
    for _ in range(max_steps):
        over = weights[rows, choice].sum() - budget
        if over <= 0:
            return choice
        d_cost = costs - costs[rows, choice][:, None]
        saved = weights[rows, choice][:, None] - weights
        ok = np.isfinite(costs) & (saved > 0)
        if not ok.any():
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            price = np.where(ok, d_cost / np.minimum(saved, over), np.inf)
        i, c = np.unravel_index(np.argmin(price), price.shape)
        choice[i] = c
    return None


def _reduced_cost_keep(costs: np.ndarray, weights: np.ndarray, budget: float
                       ) -> tuple[np.ndarray, np.ndarray | None]:
    """Mask of the (matrix, config) pairs that can be in an optimal allocation, and a feasible allocation (or None).
    With LB(lam) = Σ_i min_c (C + lam w) - lam budget and UB a feasible cost, a pair whose reduced cost
    (C + lam w)_ic - min_c' (C + lam w)_ic' exceeds UB - LB cannot be optimal."""
    rows = np.arange(costs.shape[0])

    def weight_of(lam):
        return weights[rows, _lagrangian_choice(costs, weights, lam)[0]].sum()

    lo, hi = 0.0, 1.0
    for _ in range(200):  # the heavier lam, the lighter the choice: find a feasible one
        if weight_of(hi) <= budget:
            break
        lo, hi = hi, hi * 4
    else:
        return np.ones_like(costs, dtype=bool), None
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if weight_of(mid) <= budget:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-12 * hi:
            break
    feasible = _improve(costs, weights, budget, _lagrangian_choice(costs, weights, hi)[0])
    repaired = _repair(costs, weights, budget, _lagrangian_choice(costs, weights, lo)[0])
    if repaired is not None:
        repaired = _improve(costs, weights, budget, repaired)
        if costs[rows, repaired].sum() < costs[rows, feasible].sum():
            feasible = repaired
    upper = costs[rows, feasible].sum()
    keep = np.zeros_like(costs, dtype=bool)
    keep[rows, feasible] = True
    best_bound, best_lam = -np.inf, hi
    for lam in (lo, hi):
        bound = _lagrangian_choice(costs, weights, lam)[1].sum() - lam * budget
        if bound > best_bound:
            best_bound, best_lam = bound, lam
    value = np.where(np.isfinite(costs), costs + best_lam * weights, np.inf)
    reduced = value - value.min(axis=1, keepdims=True)
    slack = (upper - best_bound) + 1e-9 * max(abs(upper), 1.0)  # float safety margin
    return keep | (reduced <= slack), feasible


def allocate(costs, bits, numels, budget_bits_per_param: float, *, fixed_bits: float = 0.0,
             total_params: float | None = None, prune: bool = True, time_limit: float | None = None) -> list[int]:
    """One config index per matrix minimising the total cost within the budget. costs (n x m), +inf where unusable;
    bits (m,) or (n x m); numels (n,). The budget is bits/param over the matrices, or with `fixed_bits` and
    `total_params` over the whole file; an infeasible one is refused, naming the smallest feasible."""
    costs, bits, numels = _as_arrays(costs, bits, numels)
    try:
        budget = float(budget_bits_per_param)
    except (TypeError, ValueError):
        raise QbaraError(f"budget must be a number of bits per parameter, got {budget_bits_per_param!r}") from None
    fixed, total = _check_file_terms(numels, fixed_bits, total_params)
    file_terms = not (fixed == 0 and total_params is None)
    low, high = budget_range(costs, bits, numels, fixed_bits=fixed, total_params=total_params)
    if not math.isfinite(budget) or budget < low * (1 - 1e-12):
        what = "file budget" if file_terms else "budget"
        raise QbaraError(
            f"a {what} of {budget:g} bits/param is infeasible for these {len(numels)} matrices"
            f"{' and the fixed part of the file' if file_terms else ''}: the smallest feasible {what} is "
            f"{math.ceil(low * 1e4) / 1e4:.4f} bits/param (every matrix at its cheapest config); budgets "
            f"from there up to {math.ceil(high * 1e4) / 1e4:.4f} change the allocation, larger ones give "
            f"the same (lowest-error) one")
    if file_terms:  # the same problem over the matrices (module docstring); at least their smallest budget,
        # which the tolerance above may have let through a hair short
        budget = max(matrix_budget(budget, numels, fixed, total), _matrix_range(costs, bits, numels)[0])
    return _allocate(costs, bits, numels, budget, prune, time_limit)


def _allocate(costs: np.ndarray, bits: np.ndarray, numels: np.ndarray, budget: float, prune: bool,
              time_limit: float | None) -> list[int]:
    """`allocate` on checked arrays, for a feasible budget in bits/param over the matrices."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    low, high = _matrix_range(costs, bits, numels)
    n = costs.shape[0]
    if budget >= high:
        # Unconstrained: the lowest-error config of every matrix (cheapest of ties).
        best = np.where(np.isfinite(costs), costs, np.inf).min(axis=1, keepdims=True)
        masked = np.where(np.isfinite(costs) & (costs <= best), bits, np.inf)
        return [int(j) for j in masked.argmin(axis=1)]

    # Candidate (matrix, config) pairs.
    weights = numels[:, None] * bits / numels.sum()  # bits/param each choice contributes
    usable = np.isfinite(costs)
    incumbent = None
    if prune:
        keep, incumbent = _reduced_cost_keep(costs, weights, budget)
        usable &= keep
    rows, cols = [], []
    for i in range(n):
        if prune:
            idx = np.nonzero(usable[i])[0]
            keep = idx[pareto_front(bits[i, idx].tolist(), costs[i, idx].tolist())].tolist()
        else:
            keep = np.nonzero(usable[i])[0].tolist()
        rows += [i] * len(keep)
        cols += keep
    rows_a, cols_a = np.asarray(rows), np.asarray(cols)
    k = len(rows)
    cost_v = costs[rows_a, cols_a]
    # Subtract each matrix's smallest cost (a constant) and normalise: HiGHS' gaps are relative.
    cost_v = cost_v - np.array([costs[i][np.isfinite(costs[i])].min() for i in range(n)])[rows_a]
    scale = cost_v.max() if cost_v.size and cost_v.max() > 0 else 1.0
    cost_v = cost_v / scale
    weight = weights[rows_a, cols_a]
    one_each = coo_matrix((np.ones(k), (rows_a, np.arange(k))), shape=(n, k))

    rhs = budget
    options = {"mip_rel_gap": _MIP_REL_GAP, "presolve": True}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    for _ in range(5):
        with _quiet_stdout():
            res = milp(cost_v, integrality=np.ones(k), bounds=Bounds(0, 1),
                       constraints=[LinearConstraint(one_each, 1, 1),
                                    LinearConstraint(weight[None, :], -np.inf, rhs)],
                       options=options)
        if res.x is None:
            if incumbent is not None and allocation_bits(incumbent, bits, numels) <= budget * (1 + 1e-12):
                return [int(j) for j in incumbent]  # (only after a tightened retry, or on a time limit)
            raise QbaraError(f"the allocation solver found no solution ({res.message}); try a slightly larger "
                             f"budget than {budget:g} (feasible from {low:.4f})")
        x = np.round(res.x).astype(int)
        choice = np.full(n, -1)
        for idx in np.nonzero(x)[0]:
            choice[rows_a[idx]] = cols_a[idx]
        if (choice < 0).any() or x.sum() != n:  # defensive: the solver's rounding broke "one each"
            raise QbaraError(f"the allocation solver returned an invalid solution ({res.message})")
        used = allocation_bits(choice, bits, numels)
        if used <= budget * (1 + 1e-12):
            return [int(j) for j in choice]
        rhs -= (used - budget) + 1e-12 * budget  # the solver's feasibility tolerance: tighten and retry
    raise QbaraError(f"the allocation solver could not meet the budget of {budget:g} bits/param exactly; "
                     f"use a slightly larger budget")
