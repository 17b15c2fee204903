"""Diagonal empirical Fisher information of the target linear weights (data-aware LQ-LoRA, SPEC §3).

F = Σ_n (∂ℓ_n/∂W)², elementwise, over calibration sequences n, with ℓ_n the loss of sequence n alone
(per-example gradients: one backward pass per sequence, batch size 1). For a causal LM ℓ_n is the
mean next-token cross-entropy of the sequence (what `model(input_ids, labels=input_ids).loss` gives).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from qbara.atomic import save_safetensors_atomic
from qbara.errors import QbaraError

__all__ = ["fisher_information", "causal_lm_loss", "calibration_sequences", "save_fisher", "load_fisher",
           "open_fisher"]

FISHER_FORMAT = "qbara-fisher"


def causal_lm_loss(model: nn.Module, sequence: Tensor) -> Tensor:
    """Mean next-token cross-entropy of one token sequence (1-D) under a causal LM."""
    ids = sequence.reshape(1, -1).to(next(model.parameters()).device)
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def _sequences(sequences) -> list[Tensor]:
    if isinstance(sequences, Tensor):
        if sequences.dim() == 1:
            sequences = sequences[None]
        if sequences.dim() != 2:
            raise QbaraError(f"calibration sequences must be a (n, length) tensor or a list of 1-D tensors, got "
                             f"shape {tuple(sequences.shape)}")
        return list(sequences)
    seqs = [s if isinstance(s, Tensor) else torch.as_tensor(s) for s in sequences]
    if not seqs:
        raise QbaraError("no calibration sequences: pass at least one token sequence")
    return seqs


def fisher_information(model: nn.Module, sequences: Tensor | Sequence, names: Sequence[str] | None = None, *,
                       loss_fn: Callable[[nn.Module, Tensor], Tensor] | None = None,
                       progress: bool = True) -> dict[str, Tensor]:
    """Diagonal empirical Fisher of each target linear weight: name -> (d_out, d_in) fp32 tensor.

    sequences: (n, length) token ids, or a list of 1-D tensors (lengths may differ); each is one
    example. names: layer names (default: every nn.Linear but the output embedding, as
    `qbara.targets.linear_layer_names`). loss_fn(model, example) -> scalar loss (default
    `causal_lm_loss`). Runs in eval mode (no dropout); the model's requires_grad flags, gradients
    and train/eval mode are restored afterwards.
    """
    from tqdm.auto import tqdm

    seqs = _sequences(sequences)
    if names is None:
        from qbara.targets import linear_layer_names

        names = linear_layer_names(model, "all-linear", include_quantized=False)
    names = list(names)
    weights = {}
    for n in names:
        try:
            module = model.get_submodule(n)
        except AttributeError:
            raise QbaraError(f"the model has no layer named {n!r}; use names from model.named_modules()") from None
        w = getattr(module, "weight", None)
        if not isinstance(w, nn.Parameter) or w.dim() != 2 or not w.is_floating_point():
            raise QbaraError(f"{n}: needs a floating 2-D weight parameter to compute its Fisher information "
                             f"(quantized layers have none: compute it on the unquantized model)")
        weights[n] = w
    loss_fn = loss_fn or causal_lm_loss

    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    was_training = model.training
    fisher = {n: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for n, w in weights.items()}
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for w in weights.values():
            w.requires_grad_(True)
        model.eval()
        for seq in tqdm(seqs, desc="Fisher", unit="seq", disable=not progress):
            loss = loss_fn(model, seq)
            if not torch.isfinite(loss):
                raise QbaraError("a calibration sequence gave a non-finite loss; check the token ids and the model")
            loss.backward()
            for n, w in weights.items():
                if w.grad is not None:
                    fisher[n].add_(w.grad.float().square())
                    w.grad = None
    finally:
        for p, flag, grad in zip(params, saved_flags, saved_grads):
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)
    return fisher


def calibration_sequences(tokenizer, text: str, n_sequences: int, length: int, seed: int = 0) -> Tensor:
    """`n_sequences` windows of `length` tokens at random offsets of the tokenized `text`: (n, length)."""
    if n_sequences < 1 or length < 2:
        raise QbaraError("need n_sequences >= 1 and length >= 2 for calibration")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() < length:
        raise QbaraError(f"the calibration text has {ids.numel()} tokens, fewer than length={length}; "
                         f"use more text or shorter sequences")
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - length + 1, (n_sequences,), generator=g)
    return torch.stack([ids[s:s + length] for s in starts.tolist()])


def save_fisher(fisher: Mapping[str, Tensor], path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write name -> Fisher matrix as safetensors (fp32), with string metadata."""
    meta = {"format": FISHER_FORMAT}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    return save_safetensors_atomic({n: t.float() for n, t in fisher.items()}, path, metadata=meta)


def load_fisher(path) -> dict[str, Tensor]:
    """Read a file written by `save_fisher`."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FISHER_FORMAT:
                raise QbaraError(f"{str(path)!r} is not a qbara Fisher file (written by save_fisher)")
            return {k: fh.get_tensor(k).float() for k in fh.keys()}
    except (OSError, ValueError) as exc:
        if isinstance(exc, QbaraError):
            raise
        raise QbaraError(f"cannot read the Fisher file {str(path)!r}: {exc}") from exc


def open_fisher(path):
    """A file written by `save_fisher` as a lazily read mapping (`qbara.lazy_tensors.LazyTensors`): each
    matrix is read when looked up, so LQ-LoRA at size holds one per worker."""
    from safetensors import SafetensorError, safe_open

    from qbara.lazy_tensors import LazyTensors

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise QbaraError(f"cannot read the Fisher file {str(path)!r}: {exc}") from None
    if meta.get("format") != FISHER_FORMAT:
        raise QbaraError(f"{str(path)!r} is not a qbara Fisher file (written by save_fisher)")
    return LazyTensors.from_files([path])
