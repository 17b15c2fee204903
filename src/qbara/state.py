"""What qbara records on a model: one `QbaraState`, kept as `model.qbara` (a plain attribute, so
`copy.deepcopy(model)` copies it). Read and write it through `state_of(model)`, which creates it on demand.
`enable_native_save` marks a model whose `save_pretrained` writes qbara's native folder (`qbara.native`)."""
from __future__ import annotations

import dataclasses
from typing import Any

from qbara.errors import QbaraError

__all__ = ["state_of", "on_save_pretrained", "enable_native_save"]

_ATTRIBUTE = "qbara"


@dataclasses.dataclass
class QbaraState:
    """qbara's record of a model; every field is None until something sets it.
    base_fingerprint: `model_fingerprint` of the base the adapters train on (dense, or the LQ / GPTQ quantized base).
    loaded_quant: the quant applied on load or by GPTQ, so `prepare` does not quantize again (and refuses another).
    lq, gptq: their reports. fold_rounding: relative RMS of the update lost in `merge(into="quantized")`.
    chat_template: the Jinja text of the training prompts, saved by `save_adapter` as chat_template.jinja."""

    base_fingerprint: str | None = None
    adapter_config: Any = None
    lq: Any = None
    fold_rounding: float | None = None
    loaded_quant: Any = None
    gptq: Any = None
    chat_template: str | None = None

    def forget_base(self) -> None:
        """The base weights changed (merge, dequantize): drop what described them; reports stay."""
        self.base_fingerprint = self.adapter_config = self.loaded_quant = None


def state_of(model) -> QbaraState:
    """`model.qbara`, created (empty) when the model has none yet."""
    state = getattr(model, _ATTRIBUTE, None)
    if state is None:
        state = QbaraState()
        setattr(model, _ATTRIBUTE, state)
    elif not isinstance(state, QbaraState):
        raise QbaraError(f"model.{_ATTRIBUTE} is a {type(state).__name__}, not qbara's QbaraState; qbara keeps its "
                         f"record of the model there, so leave that attribute to it")
    return state


# ---------------------------------------------------------------- save_pretrained of a qbara model

_NATIVE_CLASSES: dict[type, type] = {}
_SAVE_PRETRAINED: list = []  # qbara.native's save_pretrained, registered when qbara imports it


def on_save_pretrained(save):
    """Register `save` as marked models' save_pretrained (so lower layers need not import native)."""
    _SAVE_PRETRAINED[:] = [save]
    return save


def enable_native_save(model):
    """Make `model.save_pretrained` write qbara's native format (a same-named subclass swapped in)."""
    cls = type(model)
    if getattr(cls, "_qbara_native_save", False) or not hasattr(cls, "save_pretrained"):
        return model
    if cls not in _NATIVE_CLASSES:
        _NATIVE_CLASSES[cls] = type(cls.__name__, (cls,), {"save_pretrained": _save_pretrained,
                                                          "_qbara_native_save": True,
                                                          "__module__": cls.__module__,
                                                          "__qualname__": cls.__qualname__})
    model.__class__ = _NATIVE_CLASSES[cls]
    return model


def _save_pretrained(self, *args, **kwargs):
    return _SAVE_PRETRAINED[0](self, *args, **kwargs)
