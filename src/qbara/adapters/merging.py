"""Merging a model's adapters into their base layers (`merge`)."""
from __future__ import annotations

import math
import warnings

from torch import nn

from qbara.adapters.attach import adapter_layers
from qbara.errors import QbaraError
from qbara.state import state_of
from qbara.targets import set_submodule

__all__ = ["merge"]

_FOLD_ROUNDING_WARN = 0.05  # warn when the fp16 minima lose more than this share (relative RMS) of the update


def merge(model: nn.Module, into: str = "dense") -> nn.Module:
    """Replace each adapted layer by its merge (`AdaptedLinear.merge`), in place; a refused merge changes nothing.
    A fold records the update's share lost to the minima's rounding (relative RMS) as `model.qbara.fold_rounding`."""
    layers = adapter_layers(model)
    if not layers:
        raise QbaraError("this model has no adapters to merge; attach them with qbara.prepare(..., adapter=...) "
                         "or qbara.load_adapter first")
    for layer in layers.values():
        layer.check_merge(into)
    state = state_of(model)
    lost = total = 0.0
    for name, layer in layers.items():
        if into == "quantized":
            merged, layer_lost, layer_total = layer.fold()
            lost, total = lost + layer_lost, total + layer_total
        else:
            merged = layer.merge(into)
        set_submodule(model, name, merged)
    if into == "quantized":
        state.fold_rounding = math.sqrt(lost / total) if total > 0 else 0.0
        if state.fold_rounding > _FOLD_ROUNDING_WARN:
            warnings.warn(f"the fp16 minima could not hold {state.fold_rounding:.0%} of the update (relative "
                          f"RMS): a block constant smaller than its minimum's fp16 step is rounded away or "
                          f"overshot, so the merged model is not quite the adapter model. Evaluate the merged "
                          f"model; larger updates (more steps, higher learning rate) fold more precisely, a base "
                          f"quantized with QuantConfig(..., minimum_dtype='fp32') holds the update (+0.5 "
                          f"bits/param at G=32), and merge(into='dense') keeps it exactly", stacklevel=2)
    # The base changed: its fingerprint, the quant it was loaded with and the adapter config no longer describe it.
    state.forget_base()
    return model
