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

    base_fingerprint: `model_fingerprint` of the base the adapters are trained on (str). Set by `prepare` (of the
        model before quantizing), by `load_model(..., quant=)` and streaming loads (of the dense checkpoint), by
        LQ-LoRA / LoftQ and GPTQ (of the quantized base they produce) and by `load_adapter`.
    adapter_config: the `AdapterConfig` of the attached adapters; set by `attach_adapters` and `load_adapter`.
    lq: the `LQReport` (allocation, per-matrix decomposition errors) of LQ-LoRA / LoftQ (`qbara.lq`).
    fold_rounding: the share (relative RMS) of the update the fp16 minima lost in `merge(into="quantized")` (float).
    loaded_quant: the `QuantConfig` (or layer name -> QuantConfig) the model was quantized with on load or by
        GPTQ, so `prepare` attaches adapters without quantizing again (and refuses another quant).
    gptq: the `GPTQReport` of `gptq_quantize_model`.
    chat_template: the Jinja text the adapters' training prompts were rendered with (str), which `save_adapter`
        records as the folder's chat_template.jinja; set by `qbara train` and by `load_adapter` from that file.

    `forget_base` drops what describes the base once its weights change (merge, dequantize).
    """

    base_fingerprint: str | None = None
    adapter_config: Any = None
    lq: Any = None
    fold_rounding: float | None = None
    loaded_quant: Any = None
    gptq: Any = None
    chat_template: str | None = None

    def forget_base(self) -> None:
        """The base weights changed (adapters merged, layers dequantized): the fingerprint, the quant it was loaded
        with and the adapter config no longer describe the model. The reports (lq, gptq, fold_rounding) stay."""
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
    """Register `save(model, save_directory, ...)` as the save_pretrained of the models `enable_native_save`
    marks: `qbara.native` registers its writer, so the layers below it (adapters) mark models without importing
    it."""
    _SAVE_PRETRAINED[:] = [save]
    return save


def enable_native_save(model):
    """Make `model.save_pretrained` (and so HF `Trainer.save_model`) write qbara's native format while the
    model holds quantized layers or adapters; a plain model saves as transformers does. Swaps the model's
    class for a same-named subclass (kept by deepcopy); returns the model."""
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
