"""Diagonal empirical Fisher information of the target linear weights (data-aware LQ-LoRA, arXiv 2311.12023):
F = Σ_n (∂ℓ_n/∂W)² elementwise over calibration sequences n, ℓ_n the mean next-token cross-entropy of sequence n
alone (one backward pass per sequence)."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qbara.atomic import save_safetensors_atomic
from qbara.data.special_tokens import leading_bos
from qbara.errors import QbaraError
from qbara.lazy_tensors import LazyTensors
from qbara.targets import linear_layer_names
from qbara.tensor_checks import safetensors_metadata

__all__ = ["fisher_information", "calibration_sequences", "save_fisher", "load_fisher", "open_fisher"]

_FISHER_FORMAT = "qbara-fisher"


def _causal_lm_loss(model: nn.Module, sequence: Tensor) -> Tensor:
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
                       loss_fn: Callable[[nn.Module, Tensor], Tensor] | None = None, progress: bool = True,
                       folder=None, max_bytes: int | None = None):
    """Diagonal empirical Fisher of each target linear's weight: name -> (d_out, d_in) fp32 tensor.
    sequences: (n, length) token ids or a list of 1-D tensors. Eval mode; requires_grad, gradients and mode are
    restored. Gradients come from hooks (Gᵀ X), so QuantizedLinear works too. With `folder`: shards of at most
    `max_bytes` (default 1 GiB), one pass per shard, returned read lazily."""
    seqs = _sequences(sequences)
    layers = target_linears(model, names)
    loss_fn = loss_fn or _causal_lm_loss
    if folder is None:
        return _accumulate(model, layers, seqs, loss_fn, progress, tqdm)
    folder = Path(folder)
    groups = _groups(layers, max_bytes or 1 << 30)
    for i, group in enumerate(groups):
        fisher = _accumulate(model, group, seqs, loss_fn, progress, tqdm,
                             desc=f"Fisher {i + 1}/{len(groups)}" if len(groups) > 1 else "Fisher")
        save_fisher(fisher, folder / f"fisher-{i + 1:05d}-of-{len(groups):05d}.safetensors")
        del fisher
    return open_fisher(folder)


def target_linears(model: nn.Module, names, statistic: str = "the Fisher information") -> dict[str, nn.Module]:
    """Name -> module of the linears a calibration statistic is computed for (default: every linear but the
    output embedding); a name that is not a linear is refused."""
    if names is None:
        names = linear_layer_names(model, "all-linear")
    layers = {}
    for n in names:
        try:
            module = model.get_submodule(n)
        except AttributeError:
            raise QbaraError(f"the model has no layer named {n!r}; use names from model.named_modules()") from None
        shape = (getattr(module, "out_features", None), getattr(module, "in_features", None))
        if not all(isinstance(d, int) for d in shape):
            raise QbaraError(f"{n}: not a linear layer (nn.Linear or QuantizedLinear); {statistic} is computed for "
                             f"linear weights")
        layers[n] = module
    return layers


def _groups(layers: dict[str, nn.Module], max_bytes: int) -> list[dict[str, nn.Module]]:
    """Consecutive layers whose fp32 Fisher matrices fit `max_bytes` together (one layer at least)."""
    groups, size = [{}], 0
    for n, m in layers.items():
        nbytes = 4 * m.out_features * m.in_features
        if groups[-1] and size + nbytes > max_bytes:
            groups.append({})
            size = 0
        groups[-1][n] = m
        size += nbytes
    return groups


def _accumulate(model, layers, seqs, loss_fn, progress, tqdm, desc="Fisher") -> dict[str, Tensor]:
    """Σ over sequences of (per-sequence weight gradient)² for `layers`, through hooks."""
    device = next(model.parameters()).device
    fisher = {n: torch.zeros(m.out_features, m.in_features, dtype=torch.float32, device=device)
              for n, m in layers.items()}
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    was_training = model.training
    handles = []

    def pre_hook(module, args):  # a graph must reach every target layer: its input becomes a leaf if need be
        x = args[0]
        if x.requires_grad:
            return None
        return (x.detach().requires_grad_(True), *args[1:])

    def hook(name):
        def forward_hook(module, args, output):
            x = args[0].detach()

            def on_grad(grad):
                g = grad.reshape(-1, grad.shape[-1]).float()
                fisher[name].add_((g.t() @ x.reshape(-1, x.shape[-1]).float()).square_())

            output.register_hook(on_grad)
        return forward_hook

    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for n, m in layers.items():
            handles.append(m.register_forward_pre_hook(pre_hook))
            handles.append(m.register_forward_hook(hook(n)))
        model.eval()
        for seq in tqdm(seqs, desc=desc, unit="seq", disable=not progress):
            loss = loss_fn(model, seq)
            if not torch.isfinite(loss):
                raise QbaraError("a calibration sequence gave a non-finite loss; check the token ids and the model")
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag, grad in zip(params, saved_flags, saved_grads):
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)
    return fisher


def calibration_sequences(tokenizer, text: str, n_sequences: int, length: int, seed: int = 0) -> Tensor:
    """`n_sequences` windows of `length` tokens at random offsets of the tokenized `text`: (n, length). Where the
    tokenizer puts a BOS before every text (Gemma), each window is that BOS and `length` - 1 tokens of the text, as
    the model reads text (without it Gemma 3 270M's loss on 32-token Hamlet chunks rises from 5.43 to 8.48)."""
    if n_sequences < 1 or length < 2:
        raise QbaraError("need n_sequences >= 1 and length >= 2 for calibration")
    bos = leading_bos(tokenizer)
    span = length - (bos is not None)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() < span:
        raise QbaraError(f"the calibration text has {ids.numel()} tokens, fewer than length={length}; "
                         f"use more text or shorter sequences")
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - span + 1, (n_sequences,), generator=g)
    head = [] if bos is None else [torch.tensor([bos], dtype=torch.long)]
    return torch.stack([torch.cat(head + [ids[s:s + span]]) for s in starts.tolist()])


def save_fisher(fisher: Mapping[str, Tensor], path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write name -> Fisher matrix as safetensors (fp32), with string metadata."""
    meta = {"format": _FISHER_FORMAT}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    return save_safetensors_atomic({n: t.float() for n, t in fisher.items()}, path, metadata=meta)


def load_fisher(path) -> dict[str, Tensor]:
    """Read a file written by `save_fisher`, or a folder of them, into memory."""
    lazy = open_fisher(path)
    return {k: lazy[k] for k in lazy}


def open_fisher(path):
    """A Fisher file or folder of shards as a `LazyTensors` mapping: each matrix is read when looked up, so
    LQ-LoRA at size holds one per worker."""
    path = Path(path)
    files = sorted(path.glob("fisher-*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise QbaraError(f"{str(path)!r} holds no Fisher shards (fisher-*.safetensors); compute the Fisher again")
    for file in files:
        if safetensors_metadata(file, "Fisher file").get("format") != _FISHER_FORMAT:
            raise QbaraError(f"{str(file)!r} is not a qbara Fisher file (written by save_fisher)")
    return LazyTensors.from_files(files)
