"""The model-level LQ-LoRA / LoftQ path: quantize every adapter target of a dense model as the Q of a
W ≈ Q + L1 L2 decomposition and start LoRA from the factors (A = L2/√s, B = L1/√s), so the model at step 0 is
Q + L1 L2.

    model = qbara.prepare(model, LQConfig(budget=2.75), AdapterConfig(rank=64))          # ILP-allocated configs
    model = qbara.prepare(model, LQConfig(configs=QuantConfig("nf4"), method="loftq"),
                          AdapterConfig(rank=64))                                         # LoftQ baseline

`prepare_lq` is that one path for a model in memory (`qbara.prepare.prepare` hands an LQConfig to it); a checkpoint
folder is streamed by the models layer (`qbara.models.lq_stream.stream_lq`), which shares the steps here
(`plan_layers`, `choose_configs`, `finish_lq`). `qbara.prepare` / `qbara.lq_prepare` (top level,
`qbara.pretrained`) take either. The per-matrix algorithms are `qbara.lq.prepare`'s.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from qbara.adapters.attach import attach_adapters
from qbara.errors import QbaraError
from qbara.fingerprint import model_fingerprint
from qbara.lq.config import LQConfig
from qbara.lq.factors import store_factors
from qbara.lq.filesize import FileBudget
from qbara.lq.prepare import LQReport, quantize_with_factors
from qbara.lq.tables import error_table
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.quant.config import QuantConfig
from qbara.state import state_of
from qbara.targets import ALL_LINEAR, layer_configs, linear_layer_names, rounding_importance, set_submodule

__all__ = ["prepare_lq", "LayerPlan", "plan_layers", "choose_configs", "finish_lq", "resolve_file_budget",
           "record_file_budget"]


def prepare_lq(model: nn.Module, lq: LQConfig, adapter, *, modules=None, progress: bool = False) -> nn.Module:
    """The one LQ-LoRA / LoftQ path behind `qbara.prepare(model, LQConfig(...), AdapterConfig(...))` (and the
    `lq_prepare` / `AdapterConfig(init=...)` shorthands) for a model in memory, in place: with `lq.budget`, the
    error table (cached) -> ILP allocation; then every adapter target quantized as the Q of its decomposition
    W ≈ Q + L1 L2 -> LoRA adapters (`adapter`: rank, alpha, targets) started from the factors, so the model at
    step 0 is Q + L1 L2. Only the adapters train.

    model: the dense model. A safetensors checkpoint folder is streamed by the top-level `qbara.prepare` /
    `qbara.lq_prepare` (`qbara.models.lq_stream.stream_lq`, bit-identical), not here.
    modules: the linears to quantize. With fixed configs (default all but lm_head) those outside the adapter
    targets are quantized plainly; with a budget the ILP allocates over the adapter targets alone (the default;
    other layers stay dense). Returns the model; `model.qbara.lq` holds the report (allocation, errors).
    """
    if not isinstance(lq, LQConfig):
        raise QbaraError(f"expected a qbara.lq.LQConfig, got {type(lq).__name__}")
    adapter = lq.adapter_config(adapter)
    if isinstance(model, (str, Path)):  # streaming is the models layer's (qbara.models.lq_stream)
        raise QbaraError(f"{str(model)!r} is a checkpoint name, not a model: pass it to the top-level qbara.prepare "
                         f"(or qbara.lq_prepare), which streams a checkpoint folder from its shards, or load the "
                         f"model first (qbara.load_model)")
    if not isinstance(model, nn.Module):
        raise QbaraError(f"LQ-LoRA / LoftQ need a dense model (qbara.load_model), got {type(model).__name__}; "
                         f"qbara.prepare also takes a checkpoint folder")
    state = state_of(model)
    if state.base_fingerprint is None and hasattr(model, "config"):
        state.base_fingerprint = model_fingerprint(model)
    dense_fingerprint = state.base_fingerprint
    plan = plan_layers(model, lq, adapter, modules)
    fisher = lq.open_fisher()  # a file is read one matrix at a time
    importance = lq.open_importance()
    file = None if lq.fixed else resolve_file_budget(lq.file_budget, lambda: _model_file_budget(model, adapter))
    weights = {n: model.get_submodule(n).weight.detach() for n in plan.targets}
    configs, allocation, table = choose_configs(plan, weights, lq, adapter.rank, file, fisher, progress, importance)
    for p in model.parameters():
        p.requires_grad_(False)
    rest = rounding_importance(plan.rest, importance, require_gguf=False)
    for n, config in plan.rest.items():  # no adapter here: Q = quantize(W)
        set_submodule(model, n, QuantizedLinear.from_linear(model.get_submodule(n), config, name=n,
                                                            importance=rest.get(n)))
    factors = quantize_with_factors(model, configs, adapter.rank, method=lq.method, max_iters=lq.max_iters,
                                    loftq_iters=lq.loftq_iters, fisher=fisher, seed=lq.seed, workers=lq.workers,
                                    progress=progress, importance=importance)
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
                   progress: bool, importance: Mapping[str, Tensor] | None = None
                   ) -> tuple[dict[str, QuantConfig], object | None, object | None]:
    """(target -> config, allocation, table): the fixed configs, or the ILP's at `lq.budget` from the error table
    of `weights` (the targets' dense weights, possibly read lazily), computed (cached, with the rounding
    `importance`) unless `lq.table` is given."""
    if plan.layers is not None:
        return {n: plan.layers[n] for n in plan.targets}, None, None
    table = lq.open_table()
    if table is None:
        table = error_table(weights, None if lq.configs is None else list(lq.configs), rank=rank,
                            iters=lq.table_iters, fisher=fisher, seed=lq.seed,
                            workers=lq.workers, progress=progress, importance=importance)
    else:
        if ("importance" in table.settings) != (importance is not None):
            have = "with" if "importance" in table.settings else "without"
            raise QbaraError(f"the error table was computed {have} a rounding importance and this LQConfig has "
                             f"{'one' if importance is not None else 'none'}: its costs are another rounding's; "
                             f"recompute the table (drop table=) or match importance=")
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
    report = state_of(model).lq
    if lq.importance is not None:  # how the gguf:* blocks were rounded: "fisher", a file, or a mapping given
        report.settings["importance"] = str(lq.importance) if isinstance(lq.importance, (str, Path)) else "mapping"
    if allocation is not None:
        report.allocation = allocation
        report.settings.update(budget=lq.budget, dense_fingerprint=dense_fingerprint,
                               table_iters=table.settings.get("iters"))
        if file is not None:
            record_file_budget(report, lq.budget, file)
    if lq.factor_format is not None:
        factors = store_factors(report, factors, lq.factor_format)
    attach_adapters(model, adapter, factors=factors)
    return model


def resolve_file_budget(file_budget, defaults: Callable[[], object]):
    """LQConfig.file_budget resolved: None, a FileBudget, or True -> `defaults()`, the model's (or, streamed, the
    checkpoint's: `qbara.models.lq_stream.checkpoint_file_budget`) FileBudget with its default settings."""
    if file_budget is None or file_budget is False:
        return None
    if isinstance(file_budget, FileBudget):
        return file_budget
    if file_budget is not True:
        raise QbaraError(f"file_budget must be True, None or a qbara.lq.filesize.FileBudget, got {file_budget!r}")
    return defaults()


def _model_file_budget(model: nn.Module, adapter):
    """The default FileBudget of a model in memory over the adapter targets."""
    return FileBudget.of_model(model, adapter.target_modules)


def record_file_budget(report: LQReport, budget: float, file) -> None:
    """The allocation and settings of a report say the budget was a file budget."""
    import dataclasses

    if report.allocation is not None:
        report.allocation = dataclasses.replace(report.allocation, budget=float(budget), file=file)
    report.settings.update(budget=budget, file_budget=file.to_dict())
