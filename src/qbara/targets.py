"""Which linear layers of a model to quantize or adapt, and with which quantization config."""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from qbara.errors import QbaraError
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.quant.config import QuantConfig
from qbara.quant.formats import check_takes_importance

ALL_LINEAR = "all-linear"


def linear_layer_names(model: nn.Module, targets: str | Sequence[str] = ALL_LINEAR,
                       include_quantized: bool = True) -> list[str]:
    """Names of the linears (nn.Linear, and QuantizedLinear if `include_quantized`) that `targets` selects, never
    the output embedding. targets: "all-linear"; names matched as the full name or its last components (PEFT
    style); or a regular expression matched against the full name."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    kinds = (nn.Linear, QuantizedLinear) if include_quantized else (nn.Linear,)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds) and m is not output]
    if targets == ALL_LINEAR:
        chosen = [n for n, _ in linears]
    elif isinstance(targets, str):
        pattern = re.compile(targets)
        chosen = [n for n, _ in linears if pattern.fullmatch(n)]
    else:
        wanted = list(targets)
        chosen = [n for n, _ in linears if any(n == t or n.endswith("." + t) for t in wanted)]
    if not chosen:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
        raise QbaraError(f"no linear layer of this model matches target_modules={targets!r}; "
                         f"its linear layers are named {names or 'nothing (it has no nn.Linear to adapt)'}")
    return chosen


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def layer_configs(model: nn.Module, quant: QuantConfig | Mapping[str, QuantConfig],
                  modules=ALL_LINEAR) -> dict[str, QuantConfig]:
    """Layer name -> config for the dense linears `quant` applies to, every shape checked before any layer is
    replaced."""
    if isinstance(quant, QuantConfig):
        names = linear_layer_names(model, modules, include_quantized=False)
        per_layer = {n: quant for n in names}
    elif isinstance(quant, Mapping):
        per_layer = dict(quant)
        modules_by_name = dict(model.named_modules())
        quantized = sorted(n for n in per_layer if isinstance(modules_by_name.get(n), QuantizedLinear))
        if quantized:
            raise QbaraError(f"{quantized[:3]} are already quantized; load the dense model to quantize them "
                             f"(again)")
        missing = sorted(n for n in per_layer if not isinstance(modules_by_name.get(n), nn.Linear))
        if missing:
            raise QbaraError(f"quantization configs name layers that are not linear layers of this model: "
                             f"{missing[:5]}; use names from model.named_modules()")
    else:
        raise QbaraError(f"quant must be a QuantConfig or a mapping of layer name to QuantConfig, got "
                         f"{type(quant).__name__}")
    for name, config in per_layer.items():
        config.check_shape(tuple(model.get_submodule(name).weight.shape), name)
    return per_layer


def rounding_importance(per_layer: Mapping[str, QuantConfig], importance: Mapping[str, Tensor] | None,
                        require_gguf: bool = True) -> Mapping[str, Tensor]:
    """The importance of each gguf:* layer of `per_layer` (empty without one); a mapping lacking one is refused,
    and with `require_gguf` so is an importance for layers none of which is gguf:* (LQ-LoRA may mix formats)."""
    if importance is None:
        return {}
    if not isinstance(importance, Mapping):
        raise QbaraError(f"importance must map layer names to tensors, got {type(importance).__name__}")
    weighted = [n for n, c in per_layer.items() if c.family.takes_importance]
    if require_gguf:
        check_takes_importance(per_layer.values())
    missing = [n for n in weighted if n not in importance]
    if missing:
        raise QbaraError(f"the importance lacks {missing[:3]} ({len(missing)} gguf:* layers); compute it for "
                         f"the same layers (qbara.lq.importance_matrix)")
    return {n: importance[n] for n in weighted}
