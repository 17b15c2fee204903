"""The one LQ-LoRA / LoftQ pipeline: each adapter target quantized as the Q of W ≈ Q + L1 L2, its LoRA started from
the factors (A = L2/√s, B = L1/√s) ("LQ-LoRA: Low-rank Plus Quantized Matrix Decomposition for Efficient Language
Model Finetuning", arXiv 2311.12023; LoftQ is its one-format case), over a model in memory or a safetensors folder
streamed without holding the dense model (both bit-identical). Decompositions, tables and the ILP: qbara.lq."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from qbara.adapters.attach import attach_adapters
from qbara.errors import QbaraError
from qbara.fingerprint import model_fingerprint
from qbara.lq.config import LQConfig, decomposition_settings
from qbara.lq.decompose import LQ_PATIENCE
from qbara.lq.factors import store_factors
from qbara.lq.filesize import FileBudget
from qbara.lq.layers import Decomposition, LQReport, decompose_layers, lq_report
from qbara.lq.tables import TABLE_MODES, error_table
from qbara.models.sources import ModelSource, open_checkpoint
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.quant.config import QuantConfig
from qbara.state import enable_native_save, state_of
from qbara.targets import ALL_LINEAR, layer_configs, linear_layer_names, rounding_importance, set_submodule

__all__ = ["build_lq_model", "quantize_with_factors"]


def build_lq_model(source: nn.Module | str | Path, lq: LQConfig, adapter, *, modules=None,
                   progress: bool = True) -> nn.Module:
    """`qbara.prepare(source, LQConfig(...), AdapterConfig(...))`: plan, (with `lq.budget`) error table
    and ILP, decompositions, the quantized model, LoRA started from the factors; the report is `model.qbara.lq`.
    source: a dense model (quantized in place) or a safetensors folder / "smollm2-135m" (streamed). modules: the linears
    to quantize; with fixed configs non-targets are quantized plainly, with a budget they stay dense."""
    if not isinstance(lq, LQConfig):
        raise QbaraError(f"expected a qbara.lq.LQConfig, got {type(lq).__name__}")
    adapter = lq.adapter_config(adapter)
    source = _source(source)
    plan = _plan_layers(source.skeleton, lq, adapter, modules)
    weights = source.weights(plan.targets)
    fisher = lq.open_fisher()  # a file or folder is read one matrix at a time
    importance = lq.open_importance()
    file = None if lq.fixed else _resolve_file_budget(lq.file_budget,
                                                      lambda: source.file_budget(adapter.target_modules))
    configs, allocation, table = _choose_configs(plan, weights, lq, adapter.rank, file, fisher, progress, importance)
    rounding_importance(plan.rest, importance, require_gguf=False)  # the plainly quantized layers' refused early
    decs = decompose_layers(weights, configs, adapter.rank, method=lq.method, max_iters=lq.max_iters,
                            loftq_iters=lq.loftq_iters, fisher=fisher, seed=lq.seed, workers=lq.workers,
                            progress=progress, importance=importance, patience=lq.patience)
    del weights
    layers = configs if plan.layers is None else plan.layers  # the decomposed targets, and the rest plainly
    model, factors = _build(source, layers, decs, importance, progress)
    _record(model, lq.method, adapter.rank, decs, fisher is not None, lq.report_settings())
    del decs
    return _attach(model, factors, lq, adapter, allocation, table, file, source.dense_fingerprint)


def quantize_with_factors(model: nn.Module, quant: QuantConfig | Mapping[str, QuantConfig], rank: int, *,
                          method: str = "lq", targets="all-linear", max_iters: int = 100, loftq_iters: int = 1,
                          fisher: Mapping[str, Tensor] | None = None, seed: int = 0, workers: int | None = None,
                          progress: bool = True, importance: Mapping[str, Tensor] | None = None,
                          patience: int = LQ_PATIENCE) -> dict[str, tuple[Tensor, Tensor]]:
    """Replace each target nn.Linear by a QuantizedLinear holding the Q of its LQ-LoRA / LoftQ
    decomposition, in place; returns name -> (L1, L2). Records `model.qbara.lq` and the new base's fingerprint
    (the factors fit this Q only)."""
    per_layer = layer_configs(model, quant, targets)  # dense linears only, every shape checked
    if not per_layer:
        raise QbaraError(f"no linear layers match the targets {targets!r}; check target_modules")
    weights = ModelSource(model).weights(per_layer)
    for n, shape in weights.shapes.items():
        if min(shape) < rank:
            raise QbaraError(f"{n}: rank {rank} exceeds the {shape} matrix's smallest side; lower the rank")
    decs = decompose_layers(weights, per_layer, rank, method=method, max_iters=max_iters, loftq_iters=loftq_iters,
                            fisher=fisher, seed=seed, workers=workers, progress=progress, importance=importance,
                            patience=patience)
    factors = _place(model, decs)
    _record(model, method, rank, decs, fisher is not None,
            decomposition_settings(method, max_iters, loftq_iters, seed, patience))
    return factors


# ------------------------------------------------------------------------------------------ building from a source


def _source(source):
    """The checkpoint to plan on and build from: a model in memory (its fingerprint recorded) or a folder."""
    if isinstance(source, (str, Path)):
        return open_checkpoint(source)
    if not isinstance(source, nn.Module):
        raise QbaraError(f"LQ-LoRA / LoftQ need a dense model (qbara.load_model), got {type(source).__name__}; "
                         f"qbara.prepare also takes a checkpoint folder")
    state = state_of(source)
    if state.base_fingerprint is None and hasattr(source, "config"):
        state.base_fingerprint = model_fingerprint(source)
    out = ModelSource(source)
    out.dense_fingerprint = state.base_fingerprint
    return out


def _build(source, layers, decs, importance, progress: bool):
    """(the model with `layers` quantized, the decomposed ones as their Q; name -> (L1, L2)). In memory the
    decomposed layers take their Q in place; streamed, their Q is used instead of quantizing the weight."""
    if isinstance(source, ModelSource):
        source.model.requires_grad_(False)
        model = source.quantize({n: c for n, c in layers.items() if n not in decs}, importance, progress=False)
        return model, _place(model, decs)
    model = source.quantize(layers, importance, progress, packed={n: dec.qtensor for n, dec in decs.items()})
    state_of(model).loaded_quant = None  # the Q of decompositions, not a plain quantization of the checkpoint
    return model, {n: (dec.L1.to("cpu"), dec.L2.to("cpu")) for n, dec in decs.items()}
# ------------------------------------------------------------------------------------------ the steps


@dataclass
class _LayerPlan:
    """The adapter `targets` (decomposed) and, with fixed configs, every quantized layer -> its config."""

    targets: list[str]
    layers: dict[str, QuantConfig] | None

    @property
    def rest(self) -> dict[str, QuantConfig]:
        """The quantized layers no adapter covers."""
        targets = set(self.targets)
        return {n: c for n, c in (self.layers or {}).items() if n not in targets}


def _plan_layers(model: nn.Module, lq: LQConfig, adapter, modules=None) -> _LayerPlan:
    """The layers `lq` and `adapter` quantize and decompose, every shape and the rank checked first."""
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
    return _LayerPlan(targets, layers)


def _choose_configs(plan: _LayerPlan, weights: Mapping[str, Tensor], lq: LQConfig, rank: int, file, fisher,
                    progress: bool, importance: Mapping[str, Tensor] | None = None
                    ) -> tuple[dict[str, QuantConfig], object | None, object | None]:
    """(target -> config, allocation, table): the fixed configs, or the ILP's at `lq.budget`."""
    if plan.layers is not None:
        return {n: plan.layers[n] for n in plan.targets}, None, None
    table = lq.open_table()
    if table is None:
        table = error_table(weights, None if lq.configs is None else list(lq.configs), rank=rank,
                            iters=lq.table_iters, fisher=fisher, seed=lq.seed, dq_mode=lq.table_mode or TABLE_MODES[0],
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


def _resolve_file_budget(file_budget, defaults: Callable[[], FileBudget]) -> FileBudget | None:
    """LQConfig.file_budget resolved: None, a FileBudget, or True -> `defaults()`."""
    if file_budget is None or file_budget is False:
        return None
    if isinstance(file_budget, FileBudget):
        return file_budget
    if file_budget is not True:
        raise QbaraError(f"file_budget must be True, None or a qbara.lq.filesize.FileBudget, got {file_budget!r}")
    return defaults()


def _place(model: nn.Module, decs: Mapping[str, Decomposition]) -> dict[str, tuple[Tensor, Tensor]]:
    """Each decomposed linear replaced by its Q; returns name -> (L1, L2) on the layer's device."""
    factors = {}
    for n, dec in decs.items():
        layer = model.get_submodule(n)
        device = layer.weight.device
        set_submodule(model, n, QuantizedLinear(dec.qtensor.to(device), layer.bias))
        factors[n] = (dec.L1.to(device), dec.L2.to(device))
    return factors


def _record(model: nn.Module, method: str, rank: int, decs, fisher: bool, settings: dict) -> None:
    """The report on the model and the fingerprint of its new quantized base (the one the factors fit)."""
    state = state_of(model)
    state.lq = lq_report(method, rank, decs, fisher=fisher, settings=settings)
    if hasattr(model, "config"):
        state.base_fingerprint = model_fingerprint(model)
    enable_native_save(model)


def _attach(model: nn.Module, factors, lq: LQConfig, adapter, allocation, table, file,
            dense_fingerprint) -> nn.Module:
    """Record the allocation, store the factors in `lq.factor_format`, and attach adapters started from them."""
    report = state_of(model).lq
    if lq.importance is not None:  # how the gguf:* blocks were rounded: "fisher", a file, or a mapping given
        report.settings["importance"] = str(lq.importance) if isinstance(lq.importance, (str, Path)) else "mapping"
    if allocation is not None:
        report.allocation = allocation
        report.settings.update(budget=lq.budget, dense_fingerprint=dense_fingerprint,
                               table_iters=table.settings.get("iters"), table_mode=table.settings.get("dq_mode"))
        if file is not None:
            _record_file_budget(report, lq.budget, file)
    if lq.factor_format is not None:
        factors = store_factors(report, factors, lq.factor_format)
    attach_adapters(model, adapter, factors=factors)
    return model


def _record_file_budget(report: LQReport, budget: float, file: FileBudget) -> None:
    """The allocation and settings of a report say the budget was a file budget."""
    if report.allocation is not None:
        report.allocation = dataclasses.replace(report.allocation, budget=float(budget), file=file)
    report.settings.update(budget=budget, file_budget=file.to_dict())
