"""What qbara records on a model: one `QbaraState`, kept as `model.qbara` (a plain attribute, so
`copy.deepcopy(model)` copies it). Read and write it through `state_of(model)`, which creates it on demand."""
from __future__ import annotations

import dataclasses
from typing import Any

from qbara.errors import QbaraError

ATTRIBUTE = "qbara"
# The loose model attributes of qbara <= 0.1, now fields of QbaraState: a model that still carries one is refused.
OLD_ATTRIBUTES = {f"qbara_{name}": name for name in
                  ("base_fingerprint", "adapter_config", "lq", "fold_rounding", "loaded_quant", "gptq")}


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
    attributes = vars(model) if hasattr(model, "__dict__") else {}
    old = sorted(set(attributes) & set(OLD_ATTRIBUTES))
    if old:
        raise QbaraError(f"this model carries {', '.join(f'model.{a}' for a in old)}, which qbara no longer reads: "
                         f"its state is one object, model.qbara (qbara.state.QbaraState); set "
                         f"{', '.join(f'model.qbara.{OLD_ATTRIBUTES[a]}' for a in old)} instead (or load the model "
                         f"again with this qbara)")
    state = getattr(model, ATTRIBUTE, None)
    if state is None:
        state = QbaraState()
        setattr(model, ATTRIBUTE, state)
    elif not isinstance(state, QbaraState):
        raise QbaraError(f"model.{ATTRIBUTE} is a {type(state).__name__}, not qbara's QbaraState; qbara keeps its "
                         f"record of the model there, so leave that attribute to it")
    return state
