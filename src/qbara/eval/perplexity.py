"""Perplexity in the GPTQ style: one token stream cut into non-overlapping windows, each scored on its own;
PPL = exp(mean NLL) over every predicted token (all but each window's first)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from qbara.data.special_tokens import leading_bos
from qbara.errors import QbaraError


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float  # exp(nll)
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # number of predicted tokens (windows * (window - 1))
    window: int  # tokens per window actually used
    windows: int  # number of windows scored


def model_device(model) -> torch.device:
    """Where the model computes: the device of its first parameter (CPU if it has none)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _context_limit(model) -> int | None:
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if limit else None


def make_windows(input_ids: torch.Tensor, window: int, max_tokens: int | None = None) -> torch.Tensor:
    """The ``(windows, window)`` matrix :func:`perplexity` scores, from the first ``max_tokens``; a trailing
    partial window is dropped unless there is no full one (then the short stream is the only window)."""
    if input_ids.dim() != 1:
        raise QbaraError(f"input_ids must be 1-D, got shape {tuple(input_ids.shape)}")
    if window < 2:
        raise QbaraError(f"window must be at least 2 tokens, got {window}")
    if max_tokens is not None:
        if max_tokens < 2:
            raise QbaraError(f"max_tokens must be at least 2, got {max_tokens}")
        input_ids = input_ids[:max_tokens]
    n = input_ids.numel()
    if n < 2:
        raise QbaraError(f"Need at least 2 tokens to measure perplexity, got {n}")
    count = n // window
    if count == 0:
        return input_ids.reshape(1, n)
    return input_ids[: count * window].reshape(count, window)


@torch.no_grad()
def perplexity(
    model,
    input_ids: torch.Tensor,
    window: int = 2048,
    max_tokens: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    bos: int | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on the 1-D token stream ``input_ids``. ``bos``: a token put before every window (the
    tokenizer's own, :func:`qbara.data.special_tokens.leading_bos`): each window is then it and ``window`` - 1
    tokens of the stream, never scoring the BOS, as a model trained to read text after one (Gemma) reads it."""
    limit = _context_limit(model)
    if limit is not None and window > limit:
        raise QbaraError(
            f"window={window} exceeds the model's context length ({limit} positions); "
            f"use window <= {limit}"
        )
    if batch_size < 1:
        raise QbaraError(f"batch_size must be >= 1, got {batch_size}")
    input_ids = torch.as_tensor(input_ids)
    if input_ids.is_floating_point() or input_ids.is_complex():
        raise QbaraError("input_ids must be an integer tensor of token ids")
    if bos is not None and window < 3:
        raise QbaraError(f"window must be at least 3 tokens when each window starts with a BOS, got {window}")
    windows = make_windows(input_ids.long(), window - (bos is not None), max_tokens)
    if bos is not None:
        windows = torch.cat([torch.full((windows.shape[0], 1), int(bos), dtype=torch.long), windows], dim=1)
    n_windows, length = windows.shape

    device = model_device(model)
    was_training = model.training
    model.eval()
    total_nll = torch.zeros((), dtype=torch.float64)
    bar = None
    if progress:
        bar = tqdm(total=n_windows, desc="perplexity", unit="window", leave=False)
    try:
        for start in range(0, n_windows, batch_size):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            # Position t predicts token t+1.
            pred = logits[:, :-1, :].float()
            target = batch[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum"
            )
            total_nll += nll.double().cpu()
            if bar is not None:
                bar.update(batch.shape[0])
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)

    tokens = n_windows * (length - 1)
    mean_nll = total_nll.item() / tokens
    ppl = math.exp(mean_nll) if mean_nll < 700 else math.inf
    return PerplexityResult(ppl=ppl, nll=mean_nll, tokens=tokens, window=length, windows=n_windows)


def text_perplexity(
    model,
    tokenizer,
    text: str,
    window: int = 2048,
    max_tokens: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """Tokenize ``text`` without special tokens and return :func:`perplexity` on it, each window after the
    tokenizer's BOS where it puts one before every text."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return perplexity(
        model,
        torch.tensor(ids, dtype=torch.long),
        window=window,
        max_tokens=max_tokens,
        batch_size=batch_size,
        progress=progress,
        bos=leading_bos(tokenizer),
    )
