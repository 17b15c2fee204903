"""Error tables for LQ-LoRA's bit allocation (arXiv 2311.12023): C[i,c] = squared decomposition error of matrix i
under config c, S[i,c] = numel_i · bits(c), and the allocation read off them. Shared work: both `decompose`
starts, one SVD_r(W) per matrix, warm-started SVDs. Against every config's own decomposition to convergence
(`converged_cost`, the authors' procedure), on SmolLM2 (rank 64, bench/results/lq_table_exactness.md):
- dq_mode="refine" (default, exact): each (b, B0, b0, B1) family's own alternation (double quant in the loop) from
  both starts, until it stalls (patience 3, `Stall`); max 1.02x, median 1.00x (0.998; Fisher-weighted, measured before
  the stall rule: max 1.04x), tests/lq/test_exact_table.py. About 0.5-0.7x the time of the same runs stopped by
  patience alone, still ~18x "shared"'s (SmolLM2 layer 15: 2020 s against 113 s, one thread, loaded machine).
- "shared" (fast, approximate): configs differing only in scale storage share one 8-iteration alternation at the
  exact absmax; overstates costs, median 1.21x, max 44.7x (NF8 at b0 = 2; Fisher-weighted median 1.30x, max
  106x), and so biases the ILP against low-b0 configs.
- "warm": "shared", then each family's own alternation from the shared run's factors, until gains stay under
  0.1 %; max 1.11x, median 1.00x, 11 % of configs above 1.03x, ~10x "shared"'s time.
- "loop": one alternation per config.
Under Fisher weights the reference itself stops early at NF8 / low b0 (the weighted alternation is not monotone).
Every member of a family gets its exact error (`_dq_errors`). Cached in $QBARA_CACHE/lq (default
~/.cache/qbara/lq), keyed by settings (the mode included), configs and contents; while computing, each finished
matrix's row is kept there (`table_rows`), so an interrupted table resumes where it stopped."""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from qbara.atomic import save_safetensors_atomic, write_json_atomic
from qbara.errors import QbaraError
from qbara.lazy_tensors import LazyTensors, tensor_shapes
from qbara.lq.configs import candidate_configs
from qbara.lq.decompose import (
    STARTS,
    Stall,
    _alternate,
    _nf_step,
    check_starts,
    decompose,
    fisher_scalings,
    low_rank_factors,
    quantize_step,
    rounding_importance_of,
)
from qbara.lq.filesize import FileBudget
from qbara.lq.ilp import allocate as ilp_allocate
from qbara.lq.ilp import budget_range
from qbara.lq.parallel import active_dist, collective_device, my_share, run_per_matrix
from qbara.lq.table_rows import TableRows
from qbara.quant.config import QuantConfig
from qbara.quant.double_quant import stored_scales
from qbara.quant.formats import check_takes_importance
from qbara.quant.nf import keep_ratios, nf_values, quantize_nf_values, scale_blocks
from qbara.targets import linear_layer_names
from qbara.tensor_checks import read_safetensors
from qbara.validate import read_json_file

__all__ = ["TABLE_MODES", "ErrorTable", "error_table", "matrix_costs", "converged_cost"]

# bump when the computation changes, so old caches are not reused
TABLE_VERSION = 5
# elements per chunk in `_dq_errors` (~1 M): its work arrays stay ~70 MB whatever the matrix
DQ_CHUNK_ELEMENTS = 1 << 20
DEFAULT_TABLE_ITERS = 8  # the fast approximation's (dq_mode="shared") iterations


def _lq_cache_dir() -> Path:
    env = os.environ.get("QBARA_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "qbara"
    return root / "lq"


# --------------------------------------------------------------------------------------------------
# Results


@dataclass
class Allocation:
    """One config per matrix chosen for a bit budget; with `file`, `budget` is in file bits/param."""

    budget: float
    names: list[str]
    indices: list[int]
    configs: dict[str, QuantConfig]
    bits_per_param: float  # achieved, over the allocated matrices
    error: float  # total cost (squared, Fisher-weighted if the table is)
    file: FileBudget | None = None

    @property
    def file_bits_per_param(self) -> float | None:
        """Achieved bits/param of the whole file (None without a file budget)."""
        return None if self.file is None else self.file.file_bits_per_param(self.bits_per_param)

    @property
    def file_bytes(self) -> float | None:
        """Size of the file's tensor data (and metadata) in bytes (None without a file budget)."""
        return None if self.file is None else self.file.file_bytes(self.bits_per_param)

    def to_dict(self) -> dict:
        data = {"budget": self.budget, "bits_per_param": self.bits_per_param, "error": self.error,
                "configs": {n: c.to_dict() for n, c in self.configs.items()}}
        if self.file is not None:
            data.update(file_bits_per_param=self.file_bits_per_param, file_bytes=self.file_bytes,
                        file_budget=self.file.to_dict())
        return data

    def counts(self) -> dict[str, int]:
        """How many matrices got each config label."""
        out: dict[str, int] = {}
        for c in self.configs.values():
            out[c.label] = out.get(c.label, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


@dataclass
class ErrorTable:
    """Costs of every (matrix, config) pair: C[i,c] = squared (Fisher-weighted) decomposition error."""

    names: list[str]
    shapes: list[tuple[int, int]]
    configs: list[QuantConfig]
    costs: Tensor  # (n, m) float64; +inf where a config cannot hold the matrix
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0  # time spent computing (0 when loaded)
    from_cache: bool = False
    path: Path | None = None

    @property
    def numels(self) -> Tensor:
        return torch.tensor([r * c for r, c in self.shapes], dtype=torch.int64)

    @property
    def bits(self) -> Tensor:
        return torch.tensor([c.bits_per_param for c in self.configs], dtype=torch.float64)

    @property
    def storage(self) -> Tensor:
        """S[i,c] = numel_i · bits(c), in bits."""
        return self.numels.double()[:, None] * self.bits[None, :]

    def budget_range(self, file_budget: FileBudget | None = None) -> tuple[float, float]:
        """(smallest feasible, largest useful) budget in bits per parameter (of the file, with `file_budget`)."""
        return budget_range(self.costs, self.bits, self.numels, **self._file_terms(file_budget))

    def allocate(self, budget_bits_per_param: float, file_budget: FileBudget | None = None) -> Allocation:
        """Solve the ILP for bits per parameter over these matrices, or with `file_budget` over the whole file."""
        idx = ilp_allocate(self.costs, self.bits, self.numels, budget_bits_per_param,
                           **self._file_terms(file_budget))
        return self.allocation(idx, budget_bits_per_param, file_budget)

    def _file_terms(self, file_budget: FileBudget | None) -> dict:
        """`ilp.allocate`'s fixed_bits / total_params of a file budget made for this table's matrices."""
        if file_budget is None:
            return {}
        if not isinstance(file_budget, FileBudget):
            raise QbaraError(f"file_budget must be a qbara.lq.filesize.FileBudget (FileBudget.of_model(model)), "
                             f"got {type(file_budget).__name__}")
        matrices = int(self.numels.sum())
        if file_budget.matrix_params != matrices:
            raise QbaraError(f"the file budget counts {file_budget.matrix_params} parameters in allocated matrices, "
                             f"this table {matrices}; build it with the table's target modules "
                             f"(FileBudget.of_model(model, targets))")
        return {"fixed_bits": file_budget.fixed_bits, "total_params": file_budget.total_params}

    def allocation(self, indices: Sequence[int], budget: float = math.nan,
                   file_budget: FileBudget | None = None) -> Allocation:
        """The Allocation of given config indices (one per matrix)."""
        numels = self.numels.double()
        bits = self.bits[list(indices)]
        used = float((numels * bits).sum() / numels.sum())
        err = float(sum(self.costs[i, j] for i, j in enumerate(indices)))
        return Allocation(float(budget), list(self.names), [int(j) for j in indices],
                          {n: self.configs[j] for n, j in zip(self.names, indices)}, used, err, file_budget)

    # -- files ------------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write `path` (.safetensors: costs) and the .json beside it (names, shapes, configs, settings)."""
        path = Path(path)
        meta = {"format": "qbara-lq-error-table", "version": TABLE_VERSION, "names": self.names,
                "shapes": [list(s) for s in self.shapes], "configs": [c.to_dict() for c in self.configs],
                "settings": self.settings, "seconds": self.seconds}
        save_safetensors_atomic({"costs": self.costs.double()}, path, metadata={"format": "qbara-lq-error-table"})
        write_json_atomic(path.with_suffix(".json"), meta)  # written last: marks the pair complete
        return path

    @classmethod
    def load(cls, path) -> "ErrorTable":
        path = Path(path)
        json_path = path.with_suffix(".json")
        fix = "delete it to recompute"
        meta = read_json_file(json_path, "LQ error table", fix=fix)
        try:
            if meta.get("format") != "qbara-lq-error-table":
                raise QbaraError(f"{str(json_path)!r} is not a qbara LQ error table")
            costs = read_safetensors(path)["costs"]
            configs = [QuantConfig.from_dict(c) for c in meta["configs"]]
            shapes = [tuple(int(d) for d in s) for s in meta["shapes"]]
            names, settings = [str(n) for n in meta["names"]], dict(meta.get("settings", {}))
        except (KeyError, TypeError, ValueError, SafetensorError) as exc:  # QbaraError is a ValueError
            raise QbaraError(f"cannot read the LQ error table {str(path)!r} ({exc}); {fix}") from None
        if tuple(costs.shape) != (len(names), len(configs)) or len(shapes) != len(names) or \
                costs.dtype != torch.float64:
            raise QbaraError(f"the LQ error table {str(path)!r} is inconsistent; {fix}")
        return cls(names, shapes, configs, costs, settings, 0.0, True, path)


# --------------------------------------------------------------------------------------------------
# One matrix


def _dq_errors(R: Tensor, absmax: Tensor, v: Tensor, bits: int, settings: list[tuple[int, str, int]],
               fisher: Tensor | None = None) -> dict[tuple[int, str, int], float]:
    """Squared (Fisher-weighted) error of NF-`bits` quantization of R (n_blocks x B0) per double-quant setting
    (b0, b1, B1), codes rounded against its stored scales ŝ; `v`: levels at the exact absmax s. With the codes of s,
    ||R - ŝv||² = Σ e² - 2δ Σ e·v + δ² Σ v² per block (e = R - s·v, δ = ŝ - s); only elements whose s/ŝ leaves
    their `keep_ratios` interval change level, and only theirs are recomputed."""
    n_blocks, B0 = R.shape
    if not settings:
        return {}
    f = None if fisher is None else fisher.reshape(-1, B0)
    S = torch.stack([stored_scales(absmax, b0, B1, dtype) for b0, dtype, B1 in settings])  # (k, n_blocks)
    totals = torch.zeros(len(settings), dtype=torch.float64, device=R.device)
    step = max(1, DQ_CHUNK_ELEMENTS // B0)  # every sum is per block: chunks bound the work arrays
    for start in range(0, n_blocks, step):
        rows = slice(start, start + step)
        totals += _dq_chunk(R[rows], absmax[rows], v[rows], bits, settings, S[:, rows],
                            None if f is None else f[rows])
    return {key: max(float(err), 0.0) for key, err in zip(settings, totals.tolist())}


def _dq_chunk(R: Tensor, absmax: Tensor, v: Tensor, bits: int, settings, S: Tensor, f: Tensor | None) -> Tensor:
    """`_dq_errors`' per-setting totals (float64, (k,)) over a run of blocks, the scales S already stored."""
    B0 = R.shape[1]
    e = R - v * absmax[:, None]
    fe, fv = (e, v) if f is None else (f * e, f * v)
    ee, ev, vv = ((a * b).sum(dim=1, dtype=torch.float64) for a, b in ((fe, e), (fe, v), (fv, v)))
    delta = S.double() - absmax.double()
    totals = (ee - 2 * delta * ev + delta * delta * vv).sum(dim=1)  # (k,) with the codes of s

    # Blocks with s = 0 or ŝ = 0 keep their codes (every code gives the same error there).
    rho = torch.where((S > 0) & (absmax > 0), absmax / S.clamp(min=1e-38), torch.ones_like(S))
    lo, hi = keep_ratios(scale_blocks(R, B0, absmax), bits)
    inv_S = torch.where(S > 0, 1.0 / S.clamp(min=1e-38), torch.zeros_like(S))
    groups: dict[tuple[int, int], list[int]] = {}  # settings with close scales: same b0 and B1
    for i, (b0, _, B1) in enumerate(settings):
        groups.setdefault((b0, B1), []).append(i)
    for members in groups.values():
        r = rho[members]
        may_move = (lo >= r.amin(dim=0)[:, None]) | (hi < r.amax(dim=0)[:, None])
        idx = may_move.view(-1).nonzero().squeeze(1)
        if not idx.numel():
            continue
        if 2 * idx.numel() > R.numel():  # most elements move (NF8 at small b0): every error directly
            r_c, v_c, f_c, block = R, v, f, None  # (n_blocks, B0): per-block scales broadcast
        else:
            block = idx // B0
            r_c, v_c = R.reshape(-1)[idx], v.reshape(-1)[idx]
            f_c = None if f is None else f.reshape(-1)[idx]
        for i in members:
            if block is None:
                s_hat, inv = S[i][:, None], inv_S[i][:, None]
            else:
                s_hat, inv = S[i].index_select(0, block), inv_S[i].index_select(0, block)
            new = nf_values((r_c * inv).clamp_(-1.0, 1.0), bits)
            err = (r_c - new * s_hat).square_()
            if block is None:
                totals[i] = (err if f_c is None else err * f_c).sum(dtype=torch.float64)
                continue
            corr = err - (r_c - v_c * s_hat).square_()
            totals[i] += (corr if f_c is None else corr * f_c).sum(dtype=torch.float64)
    return totals


# which b1 (dtype of the stored scales' maxima) runs the alternation of its family, first present wins
_REPRESENTATIVE_DTYPES = ("fp16", "bf16", "fp32")
TABLE_MODES = ("refine", "shared", "warm", "loop")  # the first is the default: exact
# (iters, patience) per mode; "warm": of each family's run from the shared run's factors
_MODE_ITERS = {"refine": (100, 3), "warm": (100, 5), "shared": (DEFAULT_TABLE_ITERS, 1),
               "loop": (DEFAULT_TABLE_ITERS, 1)}
WARM_TOL = 1e-3  # "warm": a family's run stops after `patience` iterates not improving the error by 0.1 %
REFINE_STALL: Stall | None = Stall()  # "refine": each family's runs also stop when they stall (None: patience only)


def _table_mode(dq_mode: str, iters: int | None, patience: int | None) -> tuple[str, int, int]:
    """(dq_mode, iters, patience) checked, with each mode's defaults (_MODE_ITERS) for the ones left None."""
    if dq_mode not in TABLE_MODES:
        raise QbaraError(f"dq_mode must be one of {', '.join(map(repr, TABLE_MODES))}, got {dq_mode!r}")
    default_iters, default_patience = _MODE_ITERS[dq_mode]
    iters = default_iters if iters is None else iters
    patience = default_patience if patience is None else patience
    for label, value in (("iters", iters), ("patience", patience)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise QbaraError(f"{label} must be a positive integer, got {value!r}")
    return dq_mode, iters, patience


def _rounded_costs(costs: Tensor, configs: Sequence[QuantConfig], members: Sequence[int], residual: Tensor,
                   bits: int, B0: int, fisher: Tensor | None, payload=None) -> None:
    """Lower costs[j] (j in `members`, NF-`bits`, block B0) to the exact error of quantizing `residual` as config
    j stores it (`_dq_errors`). `payload`: (levels, absmax) of the exact-scale rounding of `residual`, if at hand."""
    R = residual.reshape(-1, B0)
    v, absmax = payload if payload is not None else quantize_nf_values(R, bits, B0)[:2]
    v = v.reshape(-1, B0)
    dq_settings = sorted({(configs[j].dq_bits, configs[j].dq_dtype, configs[j].dq_block_size)
                          for j in members if configs[j].double_quant})
    dq = _dq_errors(R, absmax, v, bits, dq_settings, fisher)
    e = R - v * absmax[:, None]
    exact = float((e * e if fisher is None else e * e * fisher.reshape(-1, B0)).sum(dtype=torch.float64))
    for j in members:
        c = configs[j]
        cost = dq[(c.dq_bits, c.dq_dtype, c.dq_block_size)] if c.double_quant else exact
        costs[j] = min(float(costs[j]), float(cost))


def _representative(configs: Sequence[QuantConfig], family: Sequence[int]) -> int:
    """The config of a (b, B0, b0, B1) family whose own alternation stands for all: by _REPRESENTATIVE_DTYPES."""
    return min(family, key=lambda j: _REPRESENTATIVE_DTYPES.index(configs[j].dq_dtype))


def matrix_costs(W: Tensor, configs: Sequence[QuantConfig], rank: int = 64, iters: int | None = None,
                 fisher: Tensor | None = None, oversample: int = 10, power_iters: int = 2,
                 table_power_iters: int = 0, seed: int = 0, dq_mode: str = "refine", starts=STARTS,
                 name: str = "weight", importance: Tensor | None = None, patience: int | None = None) -> Tensor:
    """Squared (Fisher-weighted) LQ decomposition error of W under every config (float64, +inf where a config
    cannot hold W). iters, patience: per-mode defaults (_MODE_ITERS); `starts`, `importance`: as `decompose`'s."""
    dq_mode, iters, patience = _table_mode(dq_mode, iters, patience)
    starts = check_starts(starts, name)
    W = W.detach().to(torch.float32)
    fisher = None if fisher is None else fisher.detach().to(torch.float32)
    if fisher is not None and tuple(fisher.shape) != tuple(W.shape):
        raise QbaraError(f"{name}: Fisher shape {tuple(fisher.shape)} differs from the weight's {tuple(W.shape)}")
    rank = min(int(rank), min(W.shape))
    generator = torch.Generator(device=W.device).manual_seed(int(seed))
    costs = torch.full((len(configs),), math.inf, dtype=torch.float64)

    groups: dict[tuple, list[int]] = {}
    for j, c in enumerate(configs):
        if not c.fits(W.shape):
            continue  # stays +inf
        if not c.family.nf_levels or c.dq_style != "qbara":  # bnb-style double quant: alternates via quantize
            key = ("other", j)
        elif dq_mode == "loop":
            key = ("nf", c.bits, c.block_size, j)
        elif dq_mode == "refine" and c.double_quant:  # one alternation per (b, B0, b0) family
            key = ("nf", c.bits, c.block_size, c.dq_bits, c.dq_block_size)
        else:
            key = ("nf", c.bits, c.block_size)
        groups.setdefault(key, []).append(j)
    if not groups:
        return costs
    if dq_mode == "refine":  # the config whose own alternation stands for its family, at the key's end
        groups = {key + (_representative(configs, members),) if len(key) == 5 else key: members
                  for key, members in groups.items()}

    scalings = fisher_scalings(fisher) if fisher is not None else None
    first = None
    if rank > 0 and "svd" in starts:
        L1, L2, basis = low_rank_factors(W, rank, scalings, oversample, power_iters, generator)
        first = (L1, L2), basis
    # Warm-started SVDs take `table_power_iters`; the quantize start's first (cold) one `power_iters`.
    if dq_mode == "warm":  # the shared stage as in "shared"; iters / patience are the family runs'
        iters, patience, warm = DEFAULT_TABLE_ITERS, 1, dict(max_iters=int(iters), patience=patience)
    common = dict(rank=rank, max_iters=int(iters), patience=patience, fisher=fisher, oversample=oversample,
                  power_iters=table_power_iters, generator=generator, warm_start=True,
                  stall=REFINE_STALL if dq_mode == "refine" else None,
                  first_factors=first[0] if first else None, first_basis=first[1] if first else None,
                  starts=starts, cold_power_iters=power_iters)

    for key, members in groups.items():
        if key[0] == "other":
            config = configs[members[0]]
            step = quantize_step(config, name, rounding_importance_of(config, importance, tuple(W.shape), name))
            res = _alternate(W, step, **common)
            costs[members[0]] = res.errors[res.best_iter] ** 2
            continue
        bits, B0 = key[1], key[2]
        if len(key) == 4 and configs[key[3]].double_quant:
            res = _alternate(W, _nf_step(configs[key[3]]), **common)  # double quantization inside the loop
            costs[key[3]] = res.errors[res.best_iter] ** 2
            continue

        def nf_step(R, bits=bits, B0=B0):
            v, absmax, deq = quantize_nf_values(R, bits, B0)
            return deq, (v, absmax)

        res = _alternate(W, _nf_step(configs[key[-1]]) if len(key) == 6 else nf_step, **common)
        _rounded_costs(costs, configs, members, res.residual, bits, B0, fisher,
                       payload=None if len(key) == 6 else res.payload)
        if dq_mode == "warm":
            _warm_costs(W, costs, configs, members, res, bits, B0, {**common, **warm})
    return costs


def _warm_costs(W: Tensor, costs: Tensor, configs: Sequence[QuantConfig], members: Sequence[int], shared,
                bits: int, B0: int, common: dict) -> None:
    """dq_mode="warm": per (b0, B1) family of `members` (one (b, B0)), lower costs[j] to the exact errors of its
    own alternation, double quant inside the loop, started from the shared run's best factors (svd start only,
    stopping after `patience` iterates without a WARM_TOL gain)."""
    families: dict[tuple[int, int], list[int]] = {}
    for j in members:  # configs without double quant: one family, at the exact absmax
        c = configs[j]
        families.setdefault((c.dq_bits, c.dq_block_size) if c.double_quant else (0, 0), []).append(j)
    run = {**common, "first_factors": (shared.L1, shared.L2), "first_basis": None, "starts": ("svd",),
           "tol": WARM_TOL}
    for family in families.values():
        config = configs[_representative(configs, family)] if configs[family[0]].double_quant else configs[family[0]]
        res = _alternate(W, _nf_step(config), **run)
        _rounded_costs(costs, configs, family, res.residual, bits, B0, common["fisher"])


def converged_cost(W: Tensor, config: QuantConfig, rank: int = 64, fisher: Tensor | None = None, seed: int = 0,
                   max_iters: int = 100, **kwargs) -> float:
    """The reference for a table entry: squared error of `config`'s own `decompose` run to convergence."""
    return decompose(W, config, rank, max_iters, fisher, seed=seed, **kwargs).error ** 2


# --------------------------------------------------------------------------------------------------
# Whole model


def _targets(model_or_weights, targets) -> tuple[list[str], Mapping[str, Tensor], list[tuple[int, int]]]:
    """(names, name -> weight, shapes) of the matrices to tabulate; a `LazyTensors` stays lazy."""
    if isinstance(model_or_weights, nn.Module):
        model = model_or_weights
        names = linear_layer_names(model, targets, include_quantized=False)
        weights = {n: model.get_submodule(n).weight for n in names}
    elif isinstance(model_or_weights, Mapping):
        weights = model_or_weights
        names = list(weights)
        if not isinstance(weights, LazyTensors):  # in memory: checked now (a LazyTensors checks each read)
            for n, w in weights.items():
                if not isinstance(w, Tensor) or not w.is_floating_point():
                    raise QbaraError(f"{n}: expected a floating 2-D weight tensor, got "
                                     f"{getattr(w, 'shape', type(w).__name__)}")
    else:
        raise QbaraError(f"error_table needs a model or a mapping of name -> weight, got "
                         f"{type(model_or_weights).__name__}")
    shapes = tensor_shapes(weights)
    for n in names:
        if len(shapes[n]) != 2:
            raise QbaraError(f"{n}: expected a floating 2-D weight tensor, got shape {shapes[n]}")
    return names, weights, [(int(shapes[n][0]), int(shapes[n][1])) for n in names]


def _digest(names, tensors: Mapping[str, Tensor]) -> str:
    """Content hash of the named tensors, looked up (read, for a LazyTensors) one at a time."""
    h = hashlib.blake2b(digest_size=16)
    for n in names:
        t = tensors[n].detach().to(device="cpu", dtype=torch.float32).contiguous()
        h.update(f"{n}:{tuple(t.shape)};".encode())
        h.update(t.numpy().data)
        del t
    return h.hexdigest()


def error_table(model_or_weights, configs: Sequence[QuantConfig] | None = None, *, rank: int = 64,
                iters: int | None = None, fisher: Mapping[str, Tensor] | None = None,
                importance: Mapping[str, Tensor] | None = None, targets="all-linear", oversample: int = 10,
                power_iters: int = 2, table_power_iters: int = 0,
                seed: int = 0, dq_mode: str = "refine", starts=STARTS, cache: bool = True,
                recompute: bool = False, cache_dir=None, workers: int | None = None,
                progress: bool = True, patience: int | None = None) -> ErrorTable:
    """The LQ-LoRA error table of a model's target linears (or of a name -> weight mapping).
    configs: default the 432 NF candidates. rank 0: plain quantization. iters, patience, dq_mode: see the module
    docstring and _MODE_ITERS. fisher / importance (name -> tensor): data-aware costs / gguf:* rounding, in the
    cache key. cache=False skips the disk cache, recompute=True overwrites it. With the cache, each finished
    matrix's row is saved as it comes (`TableRows`): a call interrupted resumes from them (recompute=True drops
    them). Ranks under torch.distributed share the matrices (each resumes its own) and all get the full table."""
    dq_mode, iters, patience = _table_mode(dq_mode, iters, patience)
    starts = check_starts(starts, "error_table")
    configs = list(candidate_configs() if configs is None else configs)
    if not configs or not all(isinstance(c, QuantConfig) for c in configs):
        raise QbaraError("configs must be a non-empty list of qbara.quant.QuantConfig")
    if not isinstance(rank, int) or rank < 0:
        raise QbaraError(f"rank must be a non-negative integer, got {rank!r}")
    names, weights, shapes = _targets(model_or_weights, targets)
    if fisher is not None:
        missing = [n for n in names if n not in fisher]
        if missing:
            raise QbaraError(f"the Fisher dict lacks {missing[:3]} ({len(missing)} layers); compute it for "
                             f"the same target layers (qbara.lq.fisher.fisher_information)")
        fisher_shapes = tensor_shapes(fisher)
        for n, s in zip(names, shapes):
            if tuple(fisher_shapes[n]) != s:
                raise QbaraError(f"{n}: Fisher shape {tuple(fisher_shapes[n])} differs from the weight's {s}")

    if importance is not None:
        check_takes_importance(configs)
        lacking = [n for n in names if n not in importance]
        if lacking:
            raise QbaraError(f"the importance lacks {lacking[:3]} ({len(lacking)} layers); compute it for the same "
                             f"target layers (qbara.lq.importance_matrix)")
    settings = {"version": TABLE_VERSION, "rank": rank, "iters": iters, "patience": patience, "oversample": oversample,
                "power_iters": power_iters, "table_power_iters": table_power_iters, "seed": seed,
                "dq_mode": dq_mode, "starts": list(starts),
                "weights": _digest(names, weights),
                "fisher": _digest(names, fisher) if fisher is not None else None,
                "configs": hashlib.sha256(json.dumps([c.to_dict() for c in configs]).encode()).hexdigest()[:16]}
    if importance is not None:  # only then: tables computed without one keep their cache keys
        settings["importance"] = _digest(names, importance)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    cache_path = Path(cache_dir) if cache_dir is not None else _lq_cache_dir()
    path = cache_path / f"table-{key}.safetensors"  # the key holds the weights' content hash

    dist = active_dist()
    rank_id = dist.get_rank() if dist else 0
    rows = TableRows(cache_path / f"table-{key}.partial", key, names, len(configs), warn=rank_id == 0) \
        if cache else None
    if cache and not recompute:
        table = None
        if path.is_file() and path.with_suffix(".json").is_file():
            try:
                table = ErrorTable.load(path)
            except QbaraError as err:  # a damaged cache entry is rebuilt (and overwritten) below
                if rank_id == 0:
                    warnings.warn(f"{err}: rebuilding it", stacklevel=2)
                table = None
            if table is not None and not (table.names == names and table.configs == configs
                                          and table.settings == settings):
                table = None
        ok = table is not None
        if dist:  # every rank must take the same branch
            flag = torch.tensor([1 if ok else 0], device=collective_device(dist))
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ok = bool(flag.item())
        if ok:
            if rows is not None:
                rows.finish()  # a run killed between saving the table and removing its rows
            return table

    start = time.perf_counter()
    n = len(names)
    sizes = [r * c for r, c in shapes]
    costs = torch.zeros((n, len(configs)), dtype=torch.float64)
    kwargs = dict(rank=rank, iters=iters, oversample=oversample, power_iters=power_iters,
                  table_power_iters=table_power_iters, dq_mode=dq_mode, starts=starts, patience=patience)

    share = my_share(sizes)
    resumed: dict[int, Tensor] = {}
    if rows is not None and recompute:
        rows.discard(share)
    elif rows is not None:  # the rows of this rank's share an interrupted run saved
        resumed = rows.load(share)
    for i, row in resumed.items():
        costs[i] = row

    def one(i):
        # Seeded per matrix index: the same costs whichever rank or thread computes it. Looked up here, so a
        # LazyTensors holds one matrix (and its Fisher) per worker.
        n = names[i]
        row = matrix_costs(weights[n], configs, fisher=None if fisher is None else fisher[n],
                           importance=None if importance is None else importance.get(n),
                           seed=seed * 1_000_003 + i, name=n, **kwargs)
        if rows is not None:
            rows.save(i, row)  # each worker its own file
        costs[i] = row

    desc = f"LQ error table ({len(resumed)} of {len(share)} resumed)" if resumed else "LQ error table"
    run_per_matrix([i for i in share if i not in resumed], one, sizes, workers, progress and rank_id == 0, desc)
    if dist:
        shared = costs.to(collective_device(dist))
        dist.all_reduce(shared, op=dist.ReduceOp.SUM)  # each row is non-zero on exactly one rank
        costs = shared.cpu()
    seconds = time.perf_counter() - start
    table = ErrorTable(names, shapes, configs, costs, settings, seconds, False, None)
    if cache:
        if rank_id == 0:
            table.save(path)
        if dist:
            dist.barrier()  # the cache is complete before any rank looks for it again
        rows.finish()
        table.path = path
    return table
