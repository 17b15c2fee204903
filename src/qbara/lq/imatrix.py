"""Importance matrix of the target linears: each input column's mean square activation over calibration tokens
(llama-imatrix's statistic, diag(XᵀX) / tokens), the rounding importance of gguf:* formats."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qbara.atomic import save_safetensors_atomic
from qbara.errors import QbaraError
from qbara.lq.fisher import _sequences, target_linears
from qbara.tensor_checks import read_safetensors, safetensors_metadata

__all__ = ["importance_matrix", "save_importance", "load_importance"]

_IMATRIX_FORMAT = "qbara-imatrix"


def importance_matrix(model: nn.Module, sequences: Tensor | Sequence, names: Sequence[str] | None = None, *,
                      progress: bool = True) -> dict[str, Tensor]:
    """Name -> (d_in,) fp32 mean of x² per input column of each target linear over every token of `sequences`
    (forward passes only, eval mode). names: default every linear but the output embedding."""
    seqs = _sequences(sequences)
    layers = target_linears(model, names, "an importance matrix")
    sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in layers.items()}
    counts = dict.fromkeys(layers, 0)

    def hook_for(name):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            sums[name] += x.double().square().sum(0).cpu()
            counts[name] += x.shape[0]
        return hook

    device = next(model.parameters()).device
    hooks = [m.register_forward_pre_hook(hook_for(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for seq in tqdm(seqs, desc="importance matrix", disable=not progress, leave=False):
                model(input_ids=seq.reshape(1, -1).to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {n: (sums[n] / max(counts[n], 1)).float() for n in layers}


def save_importance(importance: Mapping[str, Tensor], path) -> Path:
    """Write name -> importance (per-column vectors or per-weight tensors) as safetensors, fp32."""
    return save_safetensors_atomic({n: t.detach().float().contiguous() for n, t in importance.items()}, path,
                                   metadata={"format": _IMATRIX_FORMAT})


def load_importance(path) -> dict[str, Tensor]:
    """Read a file written by `save_importance`."""
    tensors = read_safetensors(path)  # one clear error for a missing or damaged file
    if safetensors_metadata(path, "importance file").get("format") != _IMATRIX_FORMAT:
        raise QbaraError(f"{str(path)!r} is not a qbara importance-matrix file (written by save_importance); "
                         f"compute it with qbara.lq.importance_matrix")
    return tensors
