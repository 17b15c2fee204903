"""LQ-LoRA and LoftQ decompositions over many matrices: `decompose_layers` (threads and torch.distributed ranks)
and the report left on a model (`LQReport`, `model.qbara.lq`). The whole-model pipeline is `qbara.models.lq`."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from qbara.errors import QbaraError
from qbara.lazy_tensors import tensor_shapes
from qbara.lq.config import LQ_METHODS
from qbara.lq.decompose import LQ_PATIENCE, Decomposition, decompose
from qbara.lq.loftq import loftq
from qbara.lq.parallel import active_dist, collective_device, my_share, owners, run_per_matrix
from qbara.quant.config import QuantConfig
from qbara.quant.tensor import quantize
from qbara.targets import rounding_importance

__all__ = ["LQReport", "decompose_layers", "lq_report"]


@dataclass
class LQLayer:
    """What the decomposition of one matrix gave."""

    config: QuantConfig
    errors: list[float]  # ||W - Q - L1 L2||_F (Fisher-weighted if given) after every iteration
    best_iter: int
    numel: int

    @property
    def error(self) -> float:
        return self.errors[self.best_iter]


@dataclass
class LQReport:
    """Kept on the model as `model.qbara.lq` by `qbara.prepare` with an LQConfig (and `quantize_with_factors`)."""

    method: str
    rank: int
    layers: dict[str, LQLayer]
    allocation: object | None = None  # qbara.lq.tables.Allocation when an ILP chose the configs
    fisher: bool = False
    settings: dict = field(default_factory=dict)

    @property
    def bits_per_param(self) -> float:
        """Quantized bits per parameter over the decomposed matrices (low-rank factors not counted)."""
        total = sum(layer.numel for layer in self.layers.values())
        return sum(layer.config.bits_per_param * layer.numel for layer in self.layers.values()) / total

    @property
    def total_error(self) -> float:
        """Σ ||W - Q - L1 L2||²_F over the matrices (Fisher-weighted if a Fisher matrix was used)."""
        return sum(layer.error ** 2 for layer in self.layers.values())

    def to_dict(self) -> dict:
        data = {"method": self.method, "rank": self.rank, "fisher": self.fisher,
                "bits_per_param": self.bits_per_param, "total_error": self.total_error,
                "settings": self.settings,
                "layers": {n: {"config": layer.config.to_dict(), "label": layer.config.label,
                               "bits_per_param": layer.config.bits_per_param, "numel": layer.numel,
                               "error": layer.error, "iterations": len(layer.errors),
                               "best_iter": layer.best_iter}
                           for n, layer in self.layers.items()}}
        if self.allocation is not None:
            data["budget"] = self.allocation.budget
            data["allocation_error"] = self.allocation.error
        return data


def decompose_layers(weights: Mapping[str, Tensor], configs: Mapping[str, QuantConfig], rank: int, *,
                     method: str = "lq", max_iters: int = 100, loftq_iters: int = 1,
                     fisher: Mapping[str, Tensor] | None = None, seed: int = 0, workers: int | None = None,
                     progress: bool = True, importance: Mapping[str, Tensor] | None = None,
                     patience: int = LQ_PATIENCE) -> dict[str, Decomposition]:
    """name -> LQ-LoRA (`decompose`) or LoftQ (`loftq`) decomposition of weights[name] with configs[name].
    Under torch.distributed each rank decomposes a share and broadcasts it; every rank returns all, the same as
    one process (each matrix is seeded by its index)."""
    if method not in LQ_METHODS:
        raise QbaraError(f"unknown decomposition {method!r}: choose one of {', '.join(LQ_METHODS)}")
    if method == "loftq" and fisher is not None:
        raise QbaraError("LoftQ has no Fisher-weighted variant; use method='lq' (LQ-LoRA) with a Fisher matrix")
    names = list(weights)
    shapes = tensor_shapes(weights)  # a LazyTensors answers from the file headers, reading nothing
    missing = [n for n in names if n not in configs]
    if missing:
        raise QbaraError(f"no quantization config for {missing[:3]}; give one config per matrix")
    if fisher is not None:
        lacking = [n for n in names if n not in fisher]
        if lacking:
            raise QbaraError(f"the Fisher dict lacks {lacking[:3]} ({len(lacking)} layers); compute it for the "
                             f"same target layers (qbara.lq.fisher.fisher_information)")
    importance = rounding_importance({n: configs[n] for n in names}, importance, require_gguf=False)
    for n in names:  # every shape checked before minutes of work
        configs[n].check_shape(shapes[n], n)
    sizes = [math.prod(shapes[n]) for n in names]
    results: dict[str, Decomposition] = {}

    def one(i: int) -> None:  # looked up here: a lazily read mapping holds one matrix per worker
        n = names[i]
        imp = importance.get(n)  # gguf:* layers only
        if method == "loftq":
            results[n] = loftq(weights[n], configs[n], rank, loftq_iters, seed=seed * 1_000_003 + i, name=n,
                               importance=imp)
        else:
            results[n] = decompose(weights[n], configs[n], rank, max_iters,
                                   fisher=None if fisher is None else fisher[n], seed=seed * 1_000_003 + i, name=n,
                                   importance=imp, patience=patience)

    dist = active_dist()
    first = dist is None or dist.get_rank() == 0
    run_per_matrix(my_share(sizes), one, sizes, workers, progress and first,
                   "LoftQ init" if method == "loftq" else "LQ decomposition")
    if dist is not None:
        _share_results(dist, names, shapes, configs, rank, owners(sizes), results)
    return {n: results[n] for n in names}


def _share_results(dist, names, shapes, configs, rank, owner, results) -> None:
    """Broadcast each decomposition from the rank that computed it to all ranks."""
    device = collective_device(dist)
    me = dist.get_rank()
    for i, n in enumerate(names):
        src = owner[i]
        if me == src:
            dec = results[n]
        else:  # placeholders of the right shapes and dtypes to receive into
            m, k = shapes[n]
            qt = quantize(torch.zeros(m, k), configs[n], n)
            dec = Decomposition(qt, torch.zeros(m, rank), torch.zeros(rank, k), [], 0)
        tensors = list(dec.qtensor.tensors.values()) + [dec.L1, dec.L2]
        for t in tensors:
            buf = t.to(device)
            dist.broadcast(buf, src=src)
            if me != src:
                t.copy_(buf.to(t.device))
        meta = [dec.errors, dec.best_iter] if me == src else [None, None]
        dist.broadcast_object_list(meta, src=src)
        dec.errors, dec.best_iter = list(meta[0]), int(meta[1])
        results[n] = dec


def lq_report(method: str, rank: int, decs: Mapping[str, Decomposition], *, fisher: bool, settings: dict
              ) -> LQReport:
    """The report of a set of decompositions (configs, errors per iteration, best iterates, sizes)."""
    layers = {n: LQLayer(dec.qtensor.config, list(dec.errors), dec.best_iter, dec.qtensor.numel)
              for n, dec in decs.items()}
    return LQReport(method, rank, layers, fisher=fisher, settings=dict(settings))
