"""LQ-LoRA's matrix decomposition W ≈ Q + L1 L2 (Guo et al., "LQ-LoRA: Low-rank Plus Quantized Matrix
Decomposition for Efficient Language Model Finetuning", arXiv 2311.12023), in fp32:

    Q <- 0; repeat: L1 L2 <- SVD_r(W - Q); Q <- quantize(W - L1 L2); err <- ||W - Q - L1 L2||_F
    until err stops decreasing; return the best iterate (L1 = U sqrt(S), L2 = sqrt(S) V^T)

("stops decreasing": `patience` iterates in a row without a new best, 1 by default; LQ-LoRA's builds use
LQ_PATIENCE and stop on a `Stall` as the exact error table's runs do.)

That is the "svd" start (starts=("svd",): the paper's start alone, run in this loop, which keeps the best iterate
and stops at the first iterate that does not beat it, ties included: not the paper's or the authors' code's
iterates bit for bit); `decompose` also runs a "quantize" start
(L1 L2 = 0 first, so Q = quantize(W), exact on weights already on a config's grid) and keeps the better. With a
diagonal Fisher F the SVD is row/column weighted: D_row = diag(sqrt(mean_j F_ij)), D_col = diag(sqrt(mean_i F_ij)),
SVD_r(D_row X D_col) = L~1 L~2, L1 = D_row^-1 L~1, L2 = L~2 D_col^-1; the quantization stays unweighted, the
error is ||sqrt(F) * E||_F."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from qbara.errors import QbaraError
from qbara.lq.parallel import check_cancelled
from qbara.quant.config import QuantConfig
from qbara.quant.double_quant import stored_scales
from qbara.quant.ggml import check_importance
from qbara.quant.nf import block_absmax, quantize_nf_values
from qbara.quant.tensor import QuantizedTensor, quantize

__all__ = [
    "LQ_PATIENCE", "Decomposition", "decompose", "randomized_svd", "fisher_scalings", "low_rank_factors",
    "weighted_error", "quantize_step",
]


@dataclass
class Decomposition:
    """The best iterate W ≈ dequant(qtensor) + L1 @ L2; `errors` / `best_iter`: the (Fisher-weighted) history of the
    winning start's run (`start`; None where not recorded), `start_errors`: every start's."""

    qtensor: QuantizedTensor
    L1: Tensor
    L2: Tensor
    errors: list[float]
    best_iter: int
    start: str | None = None
    start_errors: dict[str, list[float]] = field(default_factory=dict)

    @property
    def error(self) -> float:
        """The error of the returned (best) iterate."""
        return self.errors[self.best_iter]

    @property
    def rank(self) -> int:
        return int(self.L1.shape[1])

    @property
    def iterations(self) -> int:
        """Iterations of the winning start's run."""
        return len(self.errors)

    def reconstruct(self) -> Tensor:
        """dequant(Q) + L1 @ L2, fp32."""
        return self.qtensor.dequantize(torch.float32) + self.L1 @ self.L2


# --------------------------------------------------------------------------------------------------
# Randomized SVD


def _orthonormal(Y: Tensor) -> Tensor:
    return torch.linalg.qr(Y, mode="reduced")[0]


def _randomized_svd_full(X: Tensor, k: int, power_iters: int, generator: torch.Generator | None,
                         init: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of the rank-k range approximation of X: (U (m x k), S (k,), Vh (k x n))."""
    m, n = X.shape
    if init is None:
        omega = torch.randn(n, k, generator=generator, dtype=X.dtype, device=X.device)
    else:
        omega = init
    Qy = _orthonormal(X @ omega)
    for _ in range(power_iters):
        Qz = _orthonormal(X.T @ Qy)
        Qy = _orthonormal(X @ Qz)
    B = Qy.T @ X  # k x n, k << n
    # SVD of the wide B through a QR of B^T: B = R^T Q2^T, SVD(R^T) = Ub S Vb^T -> B = Ub S (Q2 Vb)^T.
    # (LAPACK's SVD of a short wide matrix is several times slower than this.)
    Q2, R = torch.linalg.qr(B.T, mode="reduced")
    Ub, S, Vbh = torch.linalg.svd(R.T, full_matrices=False)
    U = Qy @ Ub
    Vh = Vbh @ Q2.T
    return U, S, Vh


def randomized_svd(X: Tensor, rank: int, oversample: int = 10, power_iters: int = 2,
                   generator: torch.Generator | None = None,
                   init: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-`rank` truncated SVD (U (m x r), S (r,), Vh (r x n)) of X by randomized range finding (Halko et al.,
    arXiv 0909.4061): rank + oversample Gaussian columns (or `init`, n x k), `power_iters` QR'd power iterations;
    exact when rank + oversample reaches min(m, n)."""
    m, n = X.shape
    if rank == 0:
        return X.new_zeros(m, 0), X.new_zeros(0), X.new_zeros(0, n)
    k = rank + max(int(oversample), 0)
    if k >= min(m, n):
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    else:
        U, S, Vh = _randomized_svd_full(X, k, power_iters, generator, init)
    return U[:, :rank], S[:rank], Vh[:rank]


# --------------------------------------------------------------------------------------------------
# Fisher weighting


def fisher_scalings(fisher: Tensor) -> tuple[Tensor, Tensor]:
    """(d_row, d_col): sqrt of a Fisher matrix's row and column means, floored at 1e-6 of their maximum so the
    scaling can be undone; an all-zero Fisher gives unit scalings."""
    f = fisher.float()
    d_row = f.mean(dim=1).clamp_min(0).sqrt()
    d_col = f.mean(dim=0).clamp_min(0).sqrt()
    out = []
    for d in (d_row, d_col):
        top = d.max()
        out.append(torch.ones_like(d) if top <= 0 else d.clamp_min(top * 1e-6))
    return out[0], out[1]


def low_rank_factors(X: Tensor, rank: int, scalings: tuple[Tensor, Tensor] | None = None,
                     oversample: int = 10, power_iters: int = 2, generator: torch.Generator | None = None,
                     init: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """L1 (m x r), L2 (r x n) with L1 @ L2 ≈ X, weighted by `scalings` = (d_row, d_col) if given, and the right
    subspace found (n x k, scaled space; None after an exact SVD) to pass as `init` next time."""
    m, n = X.shape
    if rank == 0:
        return X.new_zeros(m, 0), X.new_zeros(0, n), None
    if scalings is not None:
        d_row, d_col = scalings
        X = X * d_row[:, None] * d_col[None, :]
    k = rank + max(int(oversample), 0)
    if k >= min(m, n):
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)
        basis = None
    else:
        U, S, Vh = _randomized_svd_full(X, k, power_iters, generator, init)
        basis = Vh.T.contiguous()
    root = S[:rank].sqrt()
    L1 = U[:, :rank] * root[None, :]
    L2 = root[:, None] * Vh[:rank]
    if scalings is not None:
        L1 = L1 / d_row[:, None]
        L2 = L2 / d_col[None, :]
    return L1.contiguous(), L2.contiguous(), basis


def weighted_error(E: Tensor, fisher: Tensor | None = None, *, sqrt_fisher: Tensor | None = None) -> float:
    """||E||_F, or ||sqrt(F) * E||_F with a Fisher matrix (or its precomputed square root)."""
    if sqrt_fisher is None and fisher is not None:
        sqrt_fisher = fisher.clamp_min(0).sqrt()
    return float(torch.linalg.vector_norm(E if sqrt_fisher is None else sqrt_fisher * E))


# --------------------------------------------------------------------------------------------------
# The alternating loop (shared with the error tables)

# LQ-LoRA's builds (LQConfig.patience): iterates in a row without improvement before a run stops, as the exact
# error table's runs, so each matrix reaches the error its table entry assumed (1: up to 10x the squared error
# at NF8, b0 = 2)
LQ_PATIENCE = 3
STARTS = ("svd", "quantize")  # where an alternation can begin; `decompose` runs both and keeps the better
# Added to the seed of the "quantize" start's generator: each start draws its own test matrices, so a start's
# run is the same whether it runs alone or with the other (and best-of-both is never worse than either).
_QUANTIZE_START_SALT = 0x9E3779B97F4A7C15


def check_starts(starts, name: str = "weight") -> tuple[str, ...]:
    """`starts` as a tuple of distinct names from STARTS (a single name may be given as a string)."""
    if isinstance(starts, str):
        starts = (starts,)
    try:
        starts = tuple(starts)
    except TypeError:
        starts = None
    if not starts or len(set(starts)) != len(starts) or not all(s in STARTS for s in starts):
        raise QbaraError(f"{name}: starts must be one or more distinct names from {STARTS}, got {starts!r}")
    return starts


@dataclass
class _LoopResult:
    payload: Any
    L1: Tensor
    L2: Tensor
    errors: list[float]  # the history of the run that holds the best iterate
    best_iter: int
    residual: Tensor  # W - L1 L2 of the best iterate (what was quantized)
    start: str = "svd"  # the start of that run
    start_errors: dict[str, list[float]] = field(default_factory=dict)  # every start's history

    @property
    def error(self) -> float:
        return self.errors[self.best_iter]


def _start_generator(generator: torch.Generator | None, start: str) -> torch.Generator | None:
    """The "svd" start draws from `generator`; "quantize" from its own, seeded from `generator`'s initial seed."""
    if start == "svd" or generator is None:
        return generator
    seed = (generator.initial_seed() + _QUANTIZE_START_SALT) % (1 << 64)
    return torch.Generator(device=generator.device).manual_seed(seed)


@dataclass(frozen=True)
class Stall:
    """Early stops of the error tables' runs (besides `patience`): a run ends once its best error fell by less than
    `gain` (relative) over its last `window` iterates; a later start also once its best is more than `behind` above
    the earlier starts' best and fell by less than `trail_gain` over its last `trail_window` iterates. On SmolLM2's
    layer-15 k_proj / q_proj (144 families each) this skips 29 % / 47 % of the iterations of patience 3 alone, every
    family's error within 1.1 % of theirs (bench/results/lq_table_exactness.md)."""

    window: int = 6
    gain: float = 2e-3
    behind: float = 0.05
    trail_window: int = 3
    trail_gain: float = 0.02

    def stops(self, bests: list[float], rival: float) -> bool:
        """Whether a run whose best error after each iterate is `bests` ends here (`rival`: earlier starts' best)."""
        if len(bests) > self.window and bests[-1] > bests[-1 - self.window] * (1.0 - self.gain):
            return True
        return (len(bests) > self.trail_window and bests[-1] > rival * (1.0 + self.behind)
                and bests[-1] > bests[-1 - self.trail_window] * (1.0 - self.trail_gain))


def _alternate(W: Tensor, quantize_step: Callable[[Tensor], tuple[Tensor, Any]], rank: int, max_iters: int,
               fisher: Tensor | None, oversample: int, power_iters: int, generator: torch.Generator | None,
               tol: float = 0.0, warm_start: bool = False,
               first_factors: tuple[Tensor, Tensor] | None = None,
               first_basis: Tensor | None = None, starts=STARTS,
               cold_power_iters: int | None = None, patience: int = 1, stall: Stall | None = None) -> _LoopResult:
    """Run the LQ alternation from each of `starts`; the smallest error wins (the earlier on a tie), error 0 ends the
    search. A run stops once `patience` iterates in a row miss the best by a relative `tol`, or by `stall`.
    `first_factors` / `first_basis`: the svd start's first SVD of W, shared by config sweeps. `warm_start` seeds each
    SVD with the previous subspace; a cold one uses `cold_power_iters`. `quantize_step(R)` -> (dequantized R,
    payload)."""
    scalings = fisher_scalings(fisher) if fisher is not None else None
    sqrt_f = fisher.clamp_min(0).sqrt() if fisher is not None else None
    cold = power_iters if cold_power_iters is None else cold_power_iters
    if rank == 0:
        starts = starts[:1]  # every start is the plain quantization of W
    best = None
    histories: dict[str, list[float]] = {}
    for start in starts:
        res = _run(W, quantize_step, rank, max_iters, scalings, sqrt_f, oversample, power_iters, cold,
                   _start_generator(generator, start), tol, warm_start, start,
                   first_factors if start == "svd" else None, first_basis if start == "svd" else None, patience,
                   stall, math.inf if best is None else best.error)
        histories[start] = res.errors
        if best is None or res.error < best.error:
            best = res
        if best.error == 0.0:
            break  # nothing left to improve
    best.start_errors = histories
    return best


def _run(W, quantize_step, rank, max_iters, scalings, sqrt_f, oversample, power_iters, cold_power_iters,
         generator, tol, warm_start, start, first_factors, first_basis, patience=1, stall=None,
         rival=math.inf) -> _LoopResult:
    errors: list[float] = []
    bests: list[float] = []  # the best error after each iterate
    best = None
    basis = first_basis
    Q = None
    stale = 0  # iterates in a row not improving on the best by more than tol
    for it in range(max_iters):
        check_cancelled()  # a Ctrl-C'd run_per_matrix stops here, not at the end of the matrix
        if it == 0 and start == "quantize":
            L1, L2 = W.new_zeros(W.shape[0], rank), W.new_zeros(rank, W.shape[1])
        elif it == 0 and first_factors is not None:
            L1, L2 = first_factors
        else:
            X = W if Q is None else W - Q
            init = basis if (warm_start and it > 0) else None
            L1, L2, new_basis = low_rank_factors(
                X, rank, scalings, oversample, power_iters if init is not None else cold_power_iters, generator,
                init=init)
            basis = new_basis
        R = W - L1 @ L2 if rank > 0 and not (it == 0 and start == "quantize") else W
        Q, payload = quantize_step(R)
        err = weighted_error(R - Q, sqrt_fisher=sqrt_f)
        errors.append(err)
        floor = errors[best.best_iter] if best is not None else math.inf  # the best before this iterate
        if best is None or err < floor:
            best = _LoopResult(payload, L1, L2, errors, it, R, start)
        bests.append(errors[best.best_iter])
        if rank == 0 or err == 0.0:
            break  # nothing alternates (or nothing is left to improve)
        if stall is not None and stall.stops(bests, rival):
            break
        if it > 0 and err >= floor * (1.0 - tol):  # with patience 1: the previous iterate (all were improvements)
            stale += 1
            if stale >= patience:
                break
        else:
            stale = 0
    best.errors = errors
    return best


def check_decompose_inputs(W, quant_config, rank, max_iters, fisher, name, patience: int = 1) -> None:
    if not isinstance(W, Tensor) or W.dim() != 2 or not W.is_floating_point():
        raise QbaraError(f"{name}: decompose needs a floating 2-D weight matrix, got "
                         f"{getattr(W, 'shape', type(W).__name__)}")
    if not isinstance(quant_config, QuantConfig):
        raise QbaraError(f"{name}: quant_config must be a qbara.quant.QuantConfig, got "
                         f"{type(quant_config).__name__}")
    if not isinstance(rank, int) or rank < 0 or rank > min(W.shape):
        raise QbaraError(f"{name}: rank must be an integer between 0 and {min(W.shape)} for a "
                         f"{tuple(W.shape)} matrix, got {rank!r}")
    if not isinstance(max_iters, int) or max_iters < 1:
        raise QbaraError(f"{name}: max_iters must be a positive integer, got {max_iters!r}")
    if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
        raise QbaraError(f"{name}: patience must be a positive integer, got {patience!r}")
    if fisher is not None:
        if not isinstance(fisher, Tensor) or tuple(fisher.shape) != tuple(W.shape):
            raise QbaraError(f"{name}: the Fisher matrix must have the weight's shape {tuple(W.shape)}, got "
                             f"{tuple(getattr(fisher, 'shape', ()))}; compute it with qbara.lq.fisher")
        if not torch.isfinite(fisher).all() or (fisher < 0).any():
            raise QbaraError(f"{name}: the Fisher matrix must be finite and non-negative; recompute it")


def decompose(W: Tensor, quant_config: QuantConfig, rank: int = 64, max_iters: int = 100,
              fisher: Tensor | None = None, oversample: int = 10, seed: int = 0, *, power_iters: int = 2,
              tol: float = 0.0, starts=STARTS, name: str = "weight", importance: Tensor | None = None,
              patience: int = 1) -> Decomposition:
    """W ≈ dequant(Q) + L1 @ L2, Q quantized by `quant_config`, L1 @ L2 of rank `rank` (0: plain quantization):
    at most `max_iters` alternations per start, each stopping once `patience` iterates in a row do not improve on
    the best by a relative `tol` (1: at the first), with patience > 1 also on a `Stall` (the exact error table's
    rule), the best iterate of all `starts` returned. `fisher` (W's shape) weights the SVD and error; the
    factors can be (near-)zero, which gives LoRA adapters no gradient."""
    check_decompose_inputs(W, quant_config, rank, max_iters, fisher, name, patience)
    importance = rounding_importance_of(quant_config, importance, tuple(W.shape), name)
    starts = check_starts(starts, name)
    quant_config.check_shape(tuple(W.shape), name)
    W = W.detach().to(torch.float32)
    if not torch.isfinite(W).all():
        raise QbaraError(f"{name}: weight contains NaN or Inf; fix the checkpoint before decomposing")
    if fisher is not None:
        fisher = fisher.detach().to(device=W.device, dtype=torch.float32)
    generator = torch.Generator(device=W.device).manual_seed(int(seed))

    res = _alternate(W, quantize_step(quant_config, name, importance), rank, max_iters, fisher, oversample,
                     power_iters, generator, tol=tol, starts=starts, patience=patience,
                     stall=Stall() if patience > 1 else None)
    # Pack the best iterate once (the loop only needs dequantized values; same codes and scales).
    qtensor = quantize(res.residual, quant_config, name, importance)
    return Decomposition(qtensor, res.L1, res.L2, res.errors, res.best_iter, res.start, res.start_errors)


def quantize_step(config: QuantConfig, name: str = "weight",
                  importance: Tensor | None = None) -> Callable[[Tensor], tuple[Tensor, Any]]:
    """R -> (dequant(quantize(R, config)), None) in fp32, the quantization half of an alternation. NF configs
    with dq_style "qbara" skip the packing (bit-identical values); `importance` reaches gguf:* configs only."""
    if not config.family.nf_levels or config.dq_style != "qbara":
        importance = importance if config.family.takes_importance else None

        def step(R: Tensor):
            return quantize(R, config, name, importance).dequantize(torch.float32), None

        return step
    return _nf_step(config)


def rounding_importance_of(config: QuantConfig, importance: Tensor | None, shape: tuple[int, int],
                           name: str = "weight") -> Tensor | None:
    """`importance` checked against `shape` for a gguf:* `config`; None for formats that round to nearest."""
    if importance is None or not config.family.takes_importance:
        return None
    return check_importance(importance, shape, name)


def _nf_step(config: QuantConfig) -> Callable[[Tensor], tuple[Tensor, Any]]:
    def step(R: Tensor):
        scales = None
        if config.double_quant:  # codes rounded against the stored (double-dequantized) scales, as quantize does
            scales = stored_scales(block_absmax(R, config.block_size), config.dq_bits, config.dq_block_size,
                                   config.dq_dtype)
        return quantize_nf_values(R, config.bits, config.block_size, scales)[2], None

    return step
