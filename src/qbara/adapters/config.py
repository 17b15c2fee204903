"""Adapter configuration: one flat dataclass, as config files and adapter records hold it."""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass

from qbara.adapters.base import AdapterMethod
from qbara.adapters.lora import LORA
from qbara.adapters.methods import DEFAULT_METHOD, METHODS
from qbara.errors import QbaraError, check_types, strict_from_dict
from qbara.options import option

__all__ = ["AdapterConfig", "QLORA", "QLORA_METHOD"]

_INITS = ("default", "loftq", "lq")
QLORA = "qlora"  # not a method of its own: LoRA on an NF4 base (the run config takes it as such)
QLORA_METHOD = LORA.name  # the method QLORA trains
_MAX_RANK = 65536  # above any layer's side: a larger rank is a typo, refused before anything is allocated


@dataclass(frozen=True)
class AdapterConfig:
    """Which adapter to train on the quantized base, and its shape (each field's help says what it means).
    init "lq" / "loftq" is set by `prepare(model, LQConfig(...), adapter)`; with a QuantConfig it is shorthand
    for `LQConfig(configs=quant, method=init)`."""

    method: str = option(DEFAULT_METHOD, "lora (QLoRA on an NF base), qalora, qbara or qahira; qlora = lora on NF4")
    rank: int = option(64, "adapter rank r")
    alpha: float = option(16.0, "LoRA alpha: the update is scaled by alpha / rank (every method)")
    dropout: float = option(0.0, "dropout on the adapter's input, in [0, 1)")
    pool: int = option(2, "qbara: the pooling factor lambda (input pooled, rank pool*rank, output repeated)")
    pool_in: int | None = option(None, "qahira: input pooling (default: the base's group size)")
    pool_out: int | None = option(None, "qahira: output repetition (default: per layer, closest to LoRA's "
                                        "parameter count at rank; the authors use 8 on every layer: preset "
                                        "authors)")
    target_modules: str | tuple[str, ...] = option("all-linear", "all-linear, or a list of module names "
                                                                 "([q_proj, v_proj])")
    init: str = option("default", "lora only: default (B = 0), loftq or lq (factors from a low-rank + quantized "
                                  "decomposition)")
    loftq_iters: int = option(1, "init loftq: alternating iterations")
    preset: str | None = option(None, "a method's named setting of its knobs, e.g. qahira 'authors' (pool_in 4, "
                                      "pool_out 8 on every layer: the authors' 4x8 tile, for an int4 base with "
                                      "block_size 4, block_rows 8); explicit knobs must agree with it")

    def __post_init__(self):
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        check_types(self, {"method": ((str,), False), "rank": ((int,), False), "alpha": ((int, float), False),
                           "dropout": ((int, float), False), "pool": ((int,), False), "pool_in": ((int,), True),
                           "pool_out": ((int,), True), "target_modules": ((str, tuple), False),
                           "init": ((str,), False), "loftq_iters": ((int,), False), "preset": ((str,), True)})
        if isinstance(self.target_modules, tuple) and not all(isinstance(t, str) for t in self.target_modules):
            raise QbaraError(f"target_modules must be 'all-linear' or a list of module names, got "
                             f"{self.target_modules!r}")
        if not 0 < self.rank <= _MAX_RANK:
            raise QbaraError(f"rank must be a positive integer up to {_MAX_RANK}, got {self.rank!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:  # a negative alpha would flip the update silently
            raise QbaraError(f"alpha must be a finite number > 0 (the update is scaled by alpha / rank), got "
                             f"{self.alpha!r}")
        if self.loftq_iters < 1:
            raise QbaraError(f"loftq_iters must be at least 1, got {self.loftq_iters!r}")
        if self.method == QLORA:
            raise QbaraError("adapter method 'qlora' is QLoRA, which is method 'lora' on an NF4 base: write "
                             "method='lora' with QuantConfig(format='nf4')")
        if self.method not in METHODS:
            close = difflib.get_close_matches(str(self.method), METHODS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise QbaraError(f"unknown adapter method {self.method!r}{hint}: choose one of {', '.join(METHODS)}")
        self._apply_preset()
        for name in ("pool", "pool_in", "pool_out"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise QbaraError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise QbaraError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in _INITS:
            raise QbaraError(f"unknown init {self.init!r}: choose one of {', '.join(_INITS)}")
        self.method_spec.check(self)

    def _apply_preset(self) -> None:
        """Fill the knobs `preset` names from the method's presets; a knob set to another value is refused."""
        if self.preset is None:
            return
        presets = self.method_spec.presets
        if self.preset not in presets:
            have = f"its presets are {', '.join(presets)}" if presets else "it has none"
            raise QbaraError(f"method {self.method!r} has no preset {self.preset!r}: {have}")
        for knob, value in presets[self.preset].items():
            given = getattr(self, knob)
            if given not in (value, self.__dataclass_fields__[knob].default):
                raise QbaraError(f"preset {self.preset!r} of {self.method} sets {knob}={value}, but {knob}={given} "
                                 f"was given; drop {knob} or the preset")
            object.__setattr__(self, knob, value)

    @property
    def method_spec(self) -> AdapterMethod:
        """The AdapterMethod `method` names."""
        return METHODS[self.method]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if isinstance(self.target_modules, tuple):
            data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "AdapterConfig":
        return strict_from_dict(cls, data)
