"""Model-level LQ-LoRA and LoftQ: quantize every target linear as Q of a W ≈ Q + L1 L2 decomposition and
start LoRA from the factors (A = L2/√s, B = L1/√s), so the model at step 0 is Q + L1 L2.

    model = qbara.prepare(model, LQConfig(budget=2.75), AdapterConfig(rank=64))          # ILP-allocated configs
    model = qbara.prepare(model, LQConfig(configs=QuantConfig("nf4"), method="loftq"),
                          AdapterConfig(rank=64))                                         # LoftQ baseline

`prepare_lq` is that one path (`qbara.prepare` hands an LQConfig to it); `lq_prepare(model, budget, rank, ...)`
and `prepare(model, quant, AdapterConfig(init="lq" | "loftq"))` are shorthands that build the LQConfig.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from qbara.errors import QbaraError
from qbara.lazy_tensors import tensor_shapes
from qbara.lq.config import LQ_METHODS, LQConfig
from qbara.lq.decompose import Decomposition, decompose
from qbara.lq.loftq import loftq
from qbara.lq.parallel import active_dist, collective_device, my_share, owners, run_per_matrix
from qbara.quant.config import QuantConfig
from qbara.quant.tensor import quantize
from qbara.state import state_of

__all__ = ["LQLayer", "LQReport", "decompose_layers", "quantize_with_factors", "prepare_lq", "lq_prepare"]

INIT_METHODS = LQ_METHODS


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
    """Kept on the model as `model.qbara.lq` by `quantize_with_factors` / `lq_prepare`."""

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
                     progress: bool = True) -> dict[str, Decomposition]:
    """name -> decomposition of weights[name] with configs[name]: LQ-LoRA's (`decompose`, best iterate)
    or LoftQ's (`loftq`, `loftq_iters` alternations).

    Matrices run on `workers` threads; under torch.distributed each rank decomposes a share and the
    results are broadcast, so every rank returns all of them (the same as one process: each matrix is
    seeded by its index).
    """
    if method not in INIT_METHODS:
        raise QbaraError(f"unknown decomposition {method!r}: choose one of {', '.join(INIT_METHODS)}")
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
    for n in names:  # every shape checked before minutes of work
        configs[n].check_shape(shapes[n], n)
    sizes = [math.prod(shapes[n]) for n in names]
    results: dict[str, Decomposition] = {}

    def one(i: int) -> None:  # looked up here: a lazily read mapping holds one matrix per worker
        n = names[i]
        if method == "loftq":
            results[n] = loftq(weights[n], configs[n], rank, loftq_iters, seed=seed * 1_000_003 + i, name=n)
        else:
            results[n] = decompose(weights[n], configs[n], rank, max_iters,
                                   fisher=None if fisher is None else fisher[n], seed=seed * 1_000_003 + i, name=n)

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


def quantize_with_factors(model: nn.Module, quant: QuantConfig | Mapping[str, QuantConfig], rank: int, *,
                          method: str = "lq", targets="all-linear", max_iters: int = 100, loftq_iters: int = 1,
                          fisher: Mapping[str, Tensor] | None = None, seed: int = 0, workers: int | None = None,
                          progress: bool = True) -> dict[str, tuple[Tensor, Tensor]]:
    """Replace each target nn.Linear of `model` by a QuantizedLinear holding the Q of its LQ-LoRA or LoftQ
    decomposition, in place; return name -> (L1, L2) for the adapters to start from.

    `quant` is one config for all targets or name -> config (an allocation). Records the report as
    `model.qbara.lq` and a fingerprint of the new quantized base as `model.qbara.base_fingerprint`
    (adapters started from these factors only fit this Q, not a plain quantization of the model).
    """
    from qbara.fingerprint import model_fingerprint
    from qbara.nn.quantized_linear import QuantizedLinear
    from qbara.targets import layer_configs, set_submodule

    per_layer = layer_configs(model, quant, targets)  # dense linears only, every shape checked
    if not per_layer:
        raise QbaraError(f"no linear layers match the targets {targets!r}; check target_modules")
    linears = {n: model.get_submodule(n) for n in per_layer}
    weights = {n: layer.weight.detach() for n, layer in linears.items()}
    for n, w in weights.items():
        if min(w.shape) < rank:
            raise QbaraError(f"{n}: rank {rank} exceeds the {tuple(w.shape)} matrix's smallest side; lower the rank")
    decs = decompose_layers(weights, per_layer, rank, method=method, max_iters=max_iters, loftq_iters=loftq_iters,
                            fisher=fisher, seed=seed, workers=workers, progress=progress)
    factors = {}
    for n, dec in decs.items():
        layer = linears[n]
        device = layer.weight.device
        set_submodule(model, n, QuantizedLinear(dec.qtensor.to(device), layer.bias))
        factors[n] = (dec.L1.to(device), dec.L2.to(device))
    state = state_of(model)
    state.lq = lq_report(method, rank, decs, fisher=fisher is not None,
                         settings={"max_iters": max_iters, "loftq_iters": loftq_iters, "seed": seed})
    if hasattr(model, "config"):
        state.base_fingerprint = model_fingerprint(model)
    from qbara.native import enable_native_save

    enable_native_save(model)
    return factors


def prepare_lq(model: nn.Module | str | Path, lq: LQConfig, adapter, *, modules=None, progress: bool = False
               ) -> nn.Module:
    """The one LQ-LoRA / LoftQ path behind `qbara.prepare(model, LQConfig(...), AdapterConfig(...))` (and the
    `lq_prepare` / `AdapterConfig(init=...)` shorthands), in place: with `lq.budget`, the error table (cached)
    -> ILP allocation; then every adapter target quantized as the Q of its decomposition W ≈ Q + L1 L2 ->
    LoRA adapters (`adapter`: rank, alpha, targets) started from the factors, so the model at step 0 is
    Q + L1 L2. Only the adapters train.

    model: the dense model, or a safetensors checkpoint folder (or "smollm2-135m"), streamed from its shards
    without ever holding the dense model (`qbara.models.lq_stream.stream_lq`; bit-identical).
    modules: the linears to quantize. With fixed configs (default all but lm_head) those outside the adapter
    targets are quantized plainly; with a budget the ILP allocates over the adapter targets alone (the default;
    other layers stay dense). Returns the model; `model.qbara.lq` holds the report (allocation, errors).
    """
    from qbara.fingerprint import model_fingerprint
    from qbara.nn.quantized_linear import QuantizedLinear
    from qbara.targets import set_submodule

    if not isinstance(lq, LQConfig):
        raise QbaraError(f"expected a qbara.lq.LQConfig, got {type(lq).__name__}")
    adapter = lq.adapter_config(adapter)
    if isinstance(model, (str, Path)):  # a checkpoint folder: streamed, never dense in memory
        from qbara.models.lq_stream import stream_lq

        return stream_lq(model, lq, adapter, modules=modules, progress=progress)[0]
    if not isinstance(model, nn.Module):
        raise QbaraError(f"LQ-LoRA / LoftQ need a dense model (qbara.load_model) or a checkpoint folder, got "
                         f"{type(model).__name__}")
    state = state_of(model)
    if state.base_fingerprint is None and hasattr(model, "config"):
        state.base_fingerprint = model_fingerprint(model)
    dense_fingerprint = state.base_fingerprint
    plan = plan_layers(model, lq, adapter, modules)
    fisher = lq.open_fisher()  # a file is read one matrix at a time
    file = None if lq.fixed else resolve_file_budget(model, lq.file_budget, adapter.target_modules)
    weights = {n: model.get_submodule(n).weight.detach() for n in plan.targets}
    configs, allocation, table = choose_configs(plan, weights, lq, adapter.rank, file, fisher, progress)
    for p in model.parameters():
        p.requires_grad_(False)
    for n, config in plan.rest.items():  # no adapter here: Q = quantize(W)
        set_submodule(model, n, QuantizedLinear.from_linear(model.get_submodule(n), config, name=n))
    factors = quantize_with_factors(model, configs, adapter.rank, method=lq.method, max_iters=lq.max_iters,
                                    loftq_iters=lq.loftq_iters, fisher=fisher, seed=lq.seed, workers=lq.workers,
                                    progress=progress)
    return finish_lq(model, factors, lq, adapter, allocation, table, file, dense_fingerprint)


@dataclass
class LayerPlan:
    """Which layers an LQ init touches: `targets` (the adapter's, decomposed) and, with fixed configs, `layers`
    (every quantized layer -> its config; None when the ILP chooses the targets' configs)."""

    targets: list[str]
    layers: dict[str, QuantConfig] | None

    @property
    def rest(self) -> dict[str, QuantConfig]:
        """The quantized layers no adapter covers (plain quantization)."""
        targets = set(self.targets)
        return {n: c for n, c in (self.layers or {}).items() if n not in targets}


def plan_layers(model: nn.Module, lq: LQConfig, adapter, modules=None) -> LayerPlan:
    """The layers of a dense model (or a weightless skeleton) that `lq` and `adapter` quantize and decompose,
    every shape checked against its config and the rank before anything is computed."""
    from qbara.nn.quantized_linear import QuantizedLinear
    from qbara.targets import ALL_LINEAR, layer_configs, linear_layer_names

    quantized = [n for n in linear_layer_names(model, adapter.target_modules)
                 if isinstance(model.get_submodule(n), QuantizedLinear)]
    if quantized:
        raise QbaraError(f"{quantized[:3]} are already quantized; LQ-LoRA / LoftQ decompose the dense weights: load "
                         f"the dense model")
    targets = linear_layer_names(model, adapter.target_modules, include_quantized=False)
    layers = None
    if lq.fixed:
        layers = layer_configs(model, lq.configs, ALL_LINEAR if modules is None else modules)
        unquantized = [n for n in targets if n not in layers]
        if unquantized:
            raise QbaraError(f"init={adapter.init!r} needs every adapter target quantized, but {unquantized[:3]} "
                             f"are not; quantize them too or narrow target_modules")
    elif modules is not None:
        chosen = set(targets)
        others = [n for n in linear_layer_names(model, modules, include_quantized=False) if n not in chosen]
        if others:
            raise QbaraError(f"the budget is allocated over the adapter targets, but modules= also selects "
                             f"{others[:3]} ({len(others)} layers) no adapter covers; add them to target_modules, "
                             f"or leave modules unset (they stay dense)")
    for n in targets:
        shape = tuple(model.get_submodule(n).weight.shape)
        if min(shape) < adapter.rank:
            raise QbaraError(f"{n}: rank {adapter.rank} exceeds the {shape} matrix's smallest side; lower the rank")
    return LayerPlan(targets, layers)


def choose_configs(plan: LayerPlan, weights: Mapping[str, Tensor], lq: LQConfig, rank: int, file, fisher,
                   progress: bool) -> tuple[dict[str, QuantConfig], object | None, object | None]:
    """(target -> config, allocation, table): the fixed configs, or the ILP's at `lq.budget` from the error table
    of `weights` (the targets' dense weights, possibly read lazily), computed (cached) unless `lq.table` is given."""
    from qbara.lq.tables import DEFAULT_TABLE_ITERS, error_table

    if plan.layers is not None:
        return {n: plan.layers[n] for n in plan.targets}, None, None
    table = lq.open_table()
    if table is None:
        table = error_table(weights, None if lq.configs is None else list(lq.configs), rank=rank,
                            iters=lq.table_iters or DEFAULT_TABLE_ITERS, fisher=fisher, seed=lq.seed,
                            workers=lq.workers, progress=progress)
    else:
        if table.names != plan.targets:
            raise QbaraError(f"the error table covers other matrices ({len(table.names)}) than the adapter targets "
                             f"({len(plan.targets)}); compute it for this model and target_modules")
        if table.settings.get("rank", rank) != rank:
            raise QbaraError(f"the error table was computed at rank {table.settings['rank']}, the adapter has rank "
                             f"{rank}; recompute it at rank {rank} or set AdapterConfig(rank="
                             f"{table.settings['rank']})")
    allocation = table.allocate(lq.budget, file)
    return allocation.configs, allocation, table


def finish_lq(model: nn.Module, factors: dict[str, tuple[Tensor, Tensor]], lq: LQConfig, adapter, allocation,
              table, file, dense_fingerprint) -> nn.Module:
    """Record the allocation in `model.qbara.lq`, store the factors in `lq.factor_format` and attach the adapters
    started from them (the last steps of `prepare_lq`, in memory or streamed)."""
    from qbara.adapters.attach import attach_adapters

    report = state_of(model).lq
    if allocation is not None:
        report.allocation = allocation
        report.settings.update(budget=lq.budget, dense_fingerprint=dense_fingerprint,
                               table_iters=table.settings.get("iters"))
        if file is not None:
            record_file_budget(report, lq.budget, file)
    if lq.factor_format is not None:
        from qbara.lq.factors import store_factors

        factors = store_factors(report, factors, lq.factor_format)
    attach_adapters(model, adapter, factors=factors)
    return model


def lq_prepare(model: nn.Module | str | Path, budget: float = 2.75, rank: int = 64,
               fisher: Mapping[str, Tensor] | str | Path | None = None, *, alpha: float = 16.0, dropout: float = 0.0,
               target_modules="all-linear",
               configs: Sequence[QuantConfig] | None = None, table=None, max_iters: int = 100,
               table_iters: int | None = None, seed: int = 0, workers: int | None = None,
               factor_format: QuantConfig | None = None, file_budget=None, progress: bool = True) -> nn.Module:
    """LQ-LoRA on a dense causal LM (or a checkpoint folder, streamed), in place: shorthand for

        qbara.prepare(model, LQConfig(budget=budget, configs=configs, fisher=fisher, ...),
                      AdapterConfig(rank=rank, alpha=alpha, dropout=dropout, target_modules=target_modules))

    the primary form (see `qbara.lq.LQConfig` for every setting and `prepare_lq` for the steps). Returns the
    model; `model.qbara.lq` holds the allocation and the per-matrix errors.
    """
    from qbara.adapters.config import AdapterConfig

    lq = LQConfig(budget=budget, configs=configs, fisher=fisher, max_iters=max_iters, table_iters=table_iters,
                  table=table, seed=seed, workers=workers, factor_format=factor_format, file_budget=file_budget)
    adapter = AdapterConfig(method="lora", rank=rank, alpha=alpha, dropout=dropout, target_modules=target_modules)
    return prepare_lq(model, lq, adapter, progress=progress)


def resolve_file_budget(model, file_budget, target_modules):
    """lq_prepare's file_budget resolved: None, a FileBudget, or True -> the model's (or checkpoint's) defaults."""
    from qbara.lq.filesize import FileBudget

    if file_budget is None or file_budget is False:
        return None
    if isinstance(file_budget, FileBudget):
        return file_budget
    if file_budget is not True:
        raise QbaraError(f"file_budget must be True, None or a qbara.lq.filesize.FileBudget, got {file_budget!r}")
    if isinstance(model, (str, Path)):
        from qbara.models.lq_stream import checkpoint_file_budget

        return checkpoint_file_budget(model, target_modules)
    return FileBudget.of_model(model, target_modules)


def record_file_budget(report: LQReport, budget: float, file) -> None:
    """The allocation and settings of a report say the budget was a file budget."""
    import dataclasses

    if report.allocation is not None:
        report.allocation = dataclasses.replace(report.allocation, budget=float(budget), file=file)
    report.settings.update(budget=budget, file_budget=file.to_dict())
