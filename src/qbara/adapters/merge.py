"""`merge`: fold every adapter of a model into its base layer."""
from __future__ import annotations

from torch import nn

from qbara.adapters.attach import adapter_layers
from qbara.errors import QbaraError
from qbara.targets import set_submodule

MERGE_TARGETS = ("dense", "quantized")


def merge(model: nn.Module, into: str = "dense") -> nn.Module:
    """Replace each adapted layer by its merge, in place, and return the model.

    dense: nn.Linear(dequant(W) + Delta W). quantized: the QA-LoRA / QA-HiRA update folds into the INT
    base's float minima exactly; the layer stays quantized with unchanged bits/param. Every layer is
    checked before any is replaced, so a refused merge leaves the model as it was.
    """
    if into not in MERGE_TARGETS:
        raise QbaraError(f"unknown merge target {into!r}: choose 'dense' or 'quantized'")
    layers = adapter_layers(model)
    if not layers:
        raise QbaraError("this model has no adapters to merge; attach them with qbara.prepare(..., adapter=...) "
                         "or qbara.load_adapter first")
    if into == "quantized":
        for name, layer in layers.items():
            problem = layer.fold_problem()
            if problem:
                raise QbaraError(f"{name}: {layer.method} cannot merge into the quantized model: {problem}; "
                                 f"use into='dense' or an adapter that folds (qalora, qahira)")
    for name, layer in layers.items():
        set_submodule(model, name, layer.merge(into))
    if hasattr(model, "qbara_adapter_config"):
        del model.qbara_adapter_config
    return model
