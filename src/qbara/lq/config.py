"""`LQConfig`: how `qbara.prepare(model, LQConfig(...), AdapterConfig(...))` computes the quantized base Q and the
LoRA factors of W ≈ Q + L1 L2 (LQ-LoRA; LoftQ is its one-format case). Examples: docs/methods.md."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from qbara.adapters.config import AdapterConfig
from qbara.errors import QbaraError, check_types, strict_from_dict
from qbara.lq.decompose import LQ_PATIENCE
from qbara.lq.filesize import FileBudget
from qbara.lq.fisher import open_fisher
from qbara.lq.imatrix import load_importance
from qbara.lq.tables import TABLE_MODES, ErrorTable
from qbara.quant.config import QuantConfig
from qbara.quant.formats import check_takes_importance

__all__ = ["LQConfig", "decomposition_settings"]

LQ_METHODS = ("lq", "loftq")
_DEFAULT_MAX_ITERS = 100
_DEFAULT_LOFTQ_ITERS = 1


@dataclass(frozen=True, eq=False)
class LQConfig:
    """LQ-LoRA / LoftQ settings; the adapter's shape (rank, alpha, target_modules) is the AdapterConfig's.

    budget: bits per parameter of the quantized matrices (of the whole file with `file_budget`); the ILP picks one of
        `configs` (default the 432 NF candidates) per matrix. None: configs is one QuantConfig or name -> QuantConfig.
    method: "lq" (best iterate of SVD-first and quantize-first runs) or "loftq" (`loftq_iters` alternations from
        quantize first, the last kept; fixed configs, no Fisher).
    fisher: name -> Fisher matrix, or a path written by `save_fisher`: weights the costs and decompositions.
    max_iters, table_iters: decomposition iterations per matrix and at most per run of the (exact) error table
        (default 100, `error_table`). patience: a decomposition stops once that many iterates in a row do not improve
        (or it stalls), the exact table's rule, so each matrix reaches the error the ILP was given (default 3; 1:
        the first that does not improve: up to 10x the squared Fisher-weighted error at NF8 with 2-bit scales;
        configs and reports recorded before 2026-12-06 ran 1). workers: matrices decomposed at once (default
        torch.get_num_threads()).
    table_mode: how the error table is computed (`error_table`'s dq_mode): "refine" (default, exact: every
        family's own decomposition to convergence) or "shared" (the fast approximation, ~1/18 the time, costs up to
        45x too high, median 1.2x), "warm".
    table: a precomputed `ErrorTable` at the adapter's rank, or its path. seed: matrix i uses seed * 1_000_003 + i.
    factor_format: store the factors in this format (e.g. NF8) and count their bits; default fp32.
    file_budget: `budget` counts the whole file: True (`FileBudget.of_model` defaults) or a `FileBudget`.
    importance: gguf:* rounding weights (llama-quantize's imatrix): name -> tensor, a `save_importance` file, or
        "fisher" (the `fisher` given)."""

    budget: float | None = None
    configs: QuantConfig | Sequence[QuantConfig] | Mapping[str, QuantConfig] | None = None
    method: str = "lq"
    fisher: Mapping | str | Path | None = None
    max_iters: int = _DEFAULT_MAX_ITERS
    loftq_iters: int = _DEFAULT_LOFTQ_ITERS
    table_iters: int | None = None
    patience: int = LQ_PATIENCE
    table_mode: str | None = None
    table: ErrorTable | str | Path | None = None
    seed: int = 0
    workers: int | None = None
    factor_format: QuantConfig | None = None
    file_budget: bool | FileBudget | None = None
    importance: Mapping | str | Path | None = None

    def __eq__(self, other):
        """Field by field; an in-memory Fisher, table or importance compares by identity (tensors have no truth
        value)."""
        if not isinstance(other, LQConfig):
            return NotImplemented
        by_identity = ("fisher", "table", "importance")
        return all(_same(getattr(self, f.name), getattr(other, f.name), f.name in by_identity)
                   for f in dataclasses.fields(self))

    __hash__ = None  # may hold dicts and tensors

    def __post_init__(self):
        check_types(self, {"budget": ((int, float), True), "method": ((str,), False),
                           "fisher": ((Mapping, str, Path), True), "max_iters": ((int,), False),
                           "loftq_iters": ((int,), False), "table_iters": ((int,), True),
                           "patience": ((int,), False),
                           "table_mode": ((str,), True),
                           "table": ((ErrorTable, str, Path), True), "seed": ((int,), False),
                           "workers": ((int,), True), "factor_format": ((QuantConfig,), True),
                           "file_budget": ((bool, FileBudget), True),
                           "importance": ((Mapping, str, Path), True)})
        object.__setattr__(self, "configs", _normalize_configs(self.configs))
        self._check_importance()
        if self.method not in LQ_METHODS:
            raise QbaraError(f"unknown LQConfig.method {self.method!r}: choose 'lq' (LQ-LoRA) or 'loftq' (LoftQ)")
        for name in ("max_iters", "loftq_iters", "table_iters", "patience", "workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise QbaraError(f"LQConfig.{name} must be a positive integer, got {value!r}")
        if self.table_mode is not None and self.table_mode not in TABLE_MODES:
            raise QbaraError(f"unknown LQConfig.table_mode {self.table_mode!r}: choose {', '.join(TABLE_MODES)} "
                             f"(refine: exact, the default; shared: fast, approximate)")
        if self.budget is not None and not (math.isfinite(self.budget) and self.budget > 0):
            raise QbaraError(f"LQConfig.budget must be a positive number of bits per parameter, got {self.budget!r}")
        if self.method == "loftq":
            return self._check_loftq()
        if self.loftq_iters != _DEFAULT_LOFTQ_ITERS:
            raise QbaraError("loftq_iters counts LoftQ's alternations; LQ-LoRA stops by max_iters: drop loftq_iters "
                             "or use method='loftq'")
        if self.budget is None:
            self._check_fixed()
        else:
            self._check_budget()

    def _check_importance(self) -> None:
        if self.importance is None:
            return
        if self.importance == "fisher" and self.fisher is None:
            raise QbaraError("importance='fisher' weights the rounding by the Fisher matrices: pass fisher= too, or "
                             "an importance matrix (qbara.lq.importance_matrix) as importance=")
        configs = self.configs
        candidates = ([] if configs is None else [configs] if isinstance(configs, QuantConfig)
                      else list(configs.values()) if isinstance(configs, Mapping) else list(configs))
        check_takes_importance(candidates, " (the default candidates are NF)")

    def _check_loftq(self) -> None:
        if self.budget is not None or not self.fixed:
            raise QbaraError("LoftQ takes one quantization config and no budget: LQConfig(method='loftq', "
                             "configs=QuantConfig(...)) (or a mapping layer name -> QuantConfig); for a bit budget "
                             "use method='lq'")
        extra = [name for name, value in (("fisher", self.fisher), ("table", self.table),
                                          ("table_iters", self.table_iters), ("table_mode", self.table_mode),
                                          ("file_budget", self.file_budget))
                 if value is not None and value is not False]
        if extra:
            raise QbaraError(f"LoftQ takes one quantization config, no Fisher matrix, error table or file budget; "
                             f"drop {', '.join(extra)} or use method='lq' (LQ-LoRA)")
        if self.max_iters != _DEFAULT_MAX_ITERS or self.patience != LQ_PATIENCE:
            raise QbaraError("max_iters and patience stop LQ-LoRA's decomposition; LoftQ's alternations are "
                             "loftq_iters: set that instead")

    def _check_fixed(self) -> None:
        if self.configs is None:
            raise QbaraError("LQConfig needs budget= (bits per parameter: LQ-LoRA's ILP chooses a config per matrix) "
                             "or configs=QuantConfig(...) (one format for every matrix)")
        if not self.fixed:
            raise QbaraError("a list of candidate configs needs budget= to choose among them; give a budget, or "
                             "configs=QuantConfig(...) for one format")
        for name in ("table", "table_iters", "table_mode"):
            if getattr(self, name) is not None:
                raise QbaraError(f"{name} belongs to the ILP allocation, which needs budget=; drop {name} or give a "
                                 f"budget")
        if self.file_budget:
            raise QbaraError("file_budget makes budget= count the whole file; give a budget, or drop file_budget")

    def _check_budget(self) -> None:
        if self.fixed:
            raise QbaraError("budget= allocates among candidate configs, but configs fixes them (one QuantConfig or "
                             "a per-layer mapping): drop budget, or give configs as a list of candidates")
        if isinstance(self.table, ErrorTable):
            self.check_table(self.table)

    def check_table(self, table: ErrorTable) -> None:
        """Refuse a precomputed table whose candidates or iterations contradict `configs` / `table_iters`."""
        if self.configs is not None and list(self.configs) != list(table.configs):
            raise QbaraError("the error table was computed for other candidate configs; drop configs (the "
                             "table's are used) or recompute the table with these")
        if self.table_iters is not None and self.table_iters != table.settings.get("iters"):
            raise QbaraError(f"the error table ran {table.settings.get('iters')} iterations per entry, not "
                             f"table_iters={self.table_iters}; drop table_iters or recompute the table")
        if self.table_mode is not None and self.table_mode != table.settings.get("dq_mode"):
            raise QbaraError(f"the error table was computed in mode {table.settings.get('dq_mode')!r}, not "
                             f"table_mode={self.table_mode!r}; drop table_mode or recompute the table")

    @property
    def fixed(self) -> bool:
        """True when the configs are given (one format or a per-layer mapping), False when the ILP chooses."""
        return isinstance(self.configs, (QuantConfig, Mapping))

    def open_fisher(self) -> Mapping | None:
        """The Fisher mapping given, or the file / folder opened lazily."""
        if isinstance(self.fisher, (str, Path)):
            return open_fisher(self.fisher)
        return self.fisher

    def open_importance(self) -> Mapping | None:
        """The rounding importance: the mapping given, the file read, or the Fisher (importance='fisher')."""
        if self.importance == "fisher":
            return self.open_fisher()
        if isinstance(self.importance, (str, Path)):
            return load_importance(self.importance)
        return self.importance

    def open_table(self) -> ErrorTable | None:
        """The precomputed error table, loaded and checked if a path was given."""
        if isinstance(self.table, (str, Path)):
            table = ErrorTable.load(self.table)
            self.check_table(table)
            return table
        return self.table

    def adapter_config(self, adapter):
        """`adapter` with init (and, for LoftQ, loftq_iters) set from this config; a contradicting one is refused."""
        if adapter is None:
            raise QbaraError("LQ-LoRA / LoftQ start LoRA adapters from the factors: pass an AdapterConfig too, e.g. "
                             "prepare(model, LQConfig(...), AdapterConfig(rank=64))")
        if not isinstance(adapter, AdapterConfig):
            raise QbaraError(f"adapter must be a qbara.AdapterConfig, got {type(adapter).__name__}")
        if not adapter.method_spec.starts_from_factors:
            raise QbaraError(f"LQ-LoRA / LoftQ initialise plain LoRA factors; use AdapterConfig(method='lora'), not "
                             f"{adapter.method!r}")
        if adapter.init not in ("default", self.method):
            raise QbaraError(f"AdapterConfig(init={adapter.init!r}) contradicts LQConfig(method={self.method!r}); "
                             f"leave init at 'default': the LQConfig says how the adapters start")
        loftq_iters = adapter.loftq_iters
        if self.method == "loftq":
            if adapter.loftq_iters not in (_DEFAULT_LOFTQ_ITERS, self.loftq_iters):
                raise QbaraError(f"AdapterConfig(loftq_iters={adapter.loftq_iters}) contradicts "
                                 f"LQConfig(loftq_iters={self.loftq_iters}); set the iterations on the LQConfig alone")
            loftq_iters = self.loftq_iters
        return dataclasses.replace(adapter, init=self.method, loftq_iters=loftq_iters)

    def report_settings(self) -> dict:
        """What `LQReport.settings` records of this config (before the allocation's entries)."""
        return decomposition_settings(self.method, self.max_iters, self.loftq_iters, self.seed, self.patience)

    def to_dict(self) -> dict:
        """The fields as JSON values; an in-memory Fisher, error table or importance is refused (save it first)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        configs = self.configs
        if isinstance(configs, QuantConfig):
            data["configs"] = configs.to_dict()
        elif isinstance(configs, Mapping):
            data["configs"] = {n: c.to_dict() for n, c in configs.items()}
        elif configs is not None:
            data["configs"] = [c.to_dict() for c in configs]
        if isinstance(self.fisher, Mapping):
            raise QbaraError("an in-memory Fisher cannot be recorded; save it (qbara.lq.save_fisher) and pass the "
                             "file as fisher=")
        if isinstance(self.importance, Mapping):
            raise QbaraError("an in-memory importance cannot be recorded; save it (qbara.lq.save_importance) and "
                             "pass the file as importance=")
        if isinstance(self.table, ErrorTable):
            if self.table.path is None:
                raise QbaraError("an in-memory error table cannot be recorded; save it (ErrorTable.save) and pass "
                                 "the path as table=")
            data["table"] = str(self.table.path)
        data.update({k: str(data[k]) for k in ("fisher", "table", "importance") if isinstance(data[k], Path)})
        if self.factor_format is not None:
            data["factor_format"] = self.factor_format.to_dict()
        if isinstance(self.file_budget, FileBudget):
            data["file_budget"] = self.file_budget.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "LQConfig":
        data = dict(data)
        configs = data.get("configs")
        if isinstance(configs, Mapping):
            one = not configs or not all(isinstance(v, Mapping) for v in configs.values())
            data["configs"] = (QuantConfig.from_dict(configs) if one
                               else {n: QuantConfig.from_dict(c) for n, c in configs.items()})
        elif isinstance(configs, (list, tuple)):
            data["configs"] = [QuantConfig.from_dict(c) if isinstance(c, Mapping) else c for c in configs]
        if isinstance(data.get("factor_format"), Mapping):
            data["factor_format"] = QuantConfig.from_dict(data["factor_format"])
        if isinstance(data.get("file_budget"), Mapping):
            data["file_budget"] = strict_from_dict(FileBudget, data["file_budget"])
        return strict_from_dict(cls, data)


def _normalize_configs(configs):
    """configs as None, a QuantConfig, a dict name -> QuantConfig or a tuple of candidates, each checked."""
    if configs is None or isinstance(configs, QuantConfig):
        return configs
    if isinstance(configs, Mapping):
        if not configs:
            raise QbaraError("LQConfig.configs is an empty mapping; name at least one layer, or give one QuantConfig")
        bad = [n for n, c in configs.items() if not isinstance(n, str) or not isinstance(c, QuantConfig)]
        if bad:
            raise QbaraError(f"LQConfig.configs as a mapping takes layer name -> QuantConfig; {bad[:3]} are not")
        return dict(configs)
    if isinstance(configs, (str, bytes, set, frozenset)) or not hasattr(configs, "__iter__"):
        raise QbaraError(f"LQConfig.configs must be a QuantConfig, a list of candidate QuantConfigs or a mapping "
                         f"layer name -> QuantConfig, got {type(configs).__name__}")
    configs = tuple(configs)
    if not configs or not all(isinstance(c, QuantConfig) for c in configs):
        raise QbaraError("LQConfig.configs as candidates must be a non-empty list of qbara.QuantConfig")
    return configs


def _same(a, b, by_identity: bool) -> bool:
    if by_identity and not isinstance(a, (str, Path)):
        return a is b
    return a == b


def decomposition_settings(method: str, max_iters: int, loftq_iters: int, seed: int, patience: int) -> dict:
    """What an `LQReport` records of how its decompositions ran (`patience` stops LQ-LoRA's alone)."""
    return {"max_iters": max_iters, "loftq_iters": loftq_iters, "seed": seed} | (
        {"patience": patience} if method == "lq" else {})
