"""Which linear layers of a model to quantize or adapt."""
from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from qbara.errors import QbaraError
from qbara.nn.quantized_linear import QuantizedLinear

ALL_LINEAR = "all-linear"


def linear_layer_names(model: nn.Module, targets: str | Sequence[str] = ALL_LINEAR,
                       include_quantized: bool = True) -> list[str]:
    """Names of the linear layers (nn.Linear, and QuantizedLinear unless `include_quantized` is False)
    selected by `targets`, never the output embedding (lm_head).

    targets: "all-linear"; a list of names matched against the full name or its last components
    (PEFT style, e.g. ["q_proj", "v_proj"]); or a regular expression matched against the full name.
    """
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
