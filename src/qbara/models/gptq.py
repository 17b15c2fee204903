"""GPTQ on a whole causal LM, then LoRA on top (the GPTQ-LoRA baseline of "LQ-LoRA: Low-rank Plus Quantized Matrix
Decomposition for Efficient Language Model Finetuning", arXiv 2311.12023). Per "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers" (arXiv 2210.17323, §5): layer by layer from input Hessians
(`qbara.quant.gptq`), the *quantized* layer's outputs feeding the next; the result is qbara's INT format."""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qbara.data.corpora import shakespeare_text
from qbara.errors import QbaraError
from qbara.fingerprint import model_fingerprint
from qbara.lq.fisher import calibration_sequences
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.quant.config import QuantConfig
from qbara.quant.gptq import DEFAULT_BLOCK_COLUMNS, DEFAULT_DAMP, gptq_quantize, hessian_accumulate, output_error
from qbara.quant.tensor import quantize
from qbara.state import enable_native_save, state_of
from qbara.targets import ALL_LINEAR, layer_configs, set_submodule

__all__ = ["DEFAULT_SAMPLES", "DEFAULT_LENGTH", "gptq_calibration", "gptq_quantize_model"]

# Calibration text: modern-spelling plays, none of them Hamlet (the perplexity text of qbara's benchmarks).
_CALIBRATION_PLAYS = ("macbeth", "othello", "lear", "julius_caesar", "tempest", "twelfth_night",
                     "romeo_and_juliet", "merchant_of_venice")
DEFAULT_SAMPLES = 128  # the GPTQ paper's 128 random segments (of 2048 tokens; 256 here, SmolLM2-sized)
DEFAULT_LENGTH = 256


@dataclass
class GPTQReport:
    """Per layer: config, and output error per token under GPTQ and round-to-nearest; settings, seconds."""

    layers: dict[str, dict] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def error_ratio(self) -> float:
        """Σ GPTQ output error / Σ round-to-nearest output error over the layers (below 1: GPTQ helps)."""
        rtn = sum(v["rtn_error"] for v in self.layers.values())
        return sum(v["gptq_error"] for v in self.layers.values()) / rtn if rtn else 1.0


def gptq_calibration(tokenizer, samples: int = DEFAULT_SAMPLES, length: int = DEFAULT_LENGTH,
                     plays: Sequence[str] = _CALIBRATION_PLAYS, exclude: Sequence[str] = ("hamlet",),
                     seed: int = 0) -> Tensor:
    """(samples, length) token windows at random offsets of `plays` less `exclude` (the eval play)."""
    skip = {p.strip().lower() for p in exclude}
    chosen = [p for p in plays if p.strip().lower() not in skip]
    if not chosen:
        raise QbaraError(f"no calibration play left after excluding {sorted(skip)}; name other plays")
    text = "\n\n".join(shakespeare_text(p) for p in chosen)
    return calibration_sequences(tokenizer, text, samples, length, seed=seed)


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the decoder layers: the ModuleList of `config.num_hidden_layers` entries."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and (count is None or len(module) == count):
            return name, module
    raise QbaraError(f"{type(model).__name__} has no list of {count or 'decoder'} layers for GPTQ to walk; "
                     f"GPTQ needs a decoder-only transformer (LLaMA, Qwen2, ...), or quantize with "
                     f"qbara.quantize_model")


def gptq_quantize_model(model: nn.Module, quant: QuantConfig | Mapping[str, QuantConfig], sequences, *,
                        modules=ALL_LINEAR, batch_size: int = 8, damp: float = DEFAULT_DAMP,
                        block_columns: int = DEFAULT_BLOCK_COLUMNS, act_order: bool = False,
                        progress: bool = True) -> nn.Module:
    """GPTQ-quantize the target linears of a causal LM in place, decoder layer after decoder layer.
    sequences: (n, length) token ids or a list of 1-D tensors; damp, block_columns, act_order: see `gptq_quantize`.
    Sets `model.qbara.gptq` and the quantized model's fingerprint, so `prepare` only attaches adapters."""
    started = time.perf_counter()
    per_layer = layer_configs(model, quant, modules)
    for name, config in per_layer.items():
        _check_format(config, name)
    prefix, layers = _decoder_layers(model)
    owned = _targets_by_layer(per_layer, prefix, len(layers))
    was_training = model.training
    model.eval()
    report = GPTQReport(settings={"damp": damp, "block_columns": block_columns, "act_order": act_order})
    try:
        with torch.no_grad():
            batches = _batches(sequences, batch_size, _device(model))
            report.settings.update(samples=sum(len(b) for b in batches), tokens=sum(b.numel() for b in batches))
            states = _first_layer_inputs(model, layers[0], batches)
            _walk_layers(model, layers, prefix, owned, per_layer, states, report,
                         {"damp": damp, "block_columns": block_columns, "act_order": act_order}, progress)
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - started
    state = state_of(model)
    state.gptq, state.loaded_quant = report, quant
    if hasattr(model, "config"):
        state.base_fingerprint = model_fingerprint(model)
    return enable_native_save(model)


def _check_format(config: QuantConfig, name: str) -> None:
    if not config.family.takes_gptq or config.block_rows != 1:
        raise QbaraError(f"{name}: GPTQ produces INT formats with 1 x G groups, not {config.label}; pass e.g. "
                         f"QuantConfig('int4', 32), or quantize this format with qbara.quantize_model")


def _targets_by_layer(per_layer: Mapping[str, QuantConfig], prefix: str, count: int) -> list[list[str]]:
    """Target names grouped by decoder layer index; a target outside the decoder layers is refused."""
    owned: list[list[str]] = [[] for _ in range(count)]
    head = f"{prefix}." if prefix else ""
    for name in per_layer:
        index = name[len(head):].split(".", 1)[0] if name.startswith(head) else ""
        if not index.isdigit() or int(index) >= count:
            raise QbaraError(f"{name} is outside the decoder layers ({prefix or 'the model'}.N), where GPTQ "
                             f"gathers its inputs; leave it out with modules=, or quantize it with qbara.quantize")
        owned[int(index)].append(name)
    return owned


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _batches(sequences, batch_size: int, device) -> list[Tensor]:
    """Calibration token ids as (b, length) batches on `device`; sequences of different lengths go alone."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise QbaraError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(sequences, Tensor):
        sequences = [sequences] if sequences.dim() == 1 else list(sequences)
    seqs = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in sequences]
    if not seqs or any(s.numel() < 1 for s in seqs):
        raise QbaraError("GPTQ needs calibration sequences: pass at least one non-empty token sequence "
                         "(e.g. gptq_calibration(tokenizer))")
    batches, run = [], []
    for s in seqs:
        if run and (len(run) == batch_size or run[0].numel() != s.numel()):
            batches.append(torch.stack(run).to(device))
            run = []
        run.append(s)
    batches.append(torch.stack(run).to(device))
    return batches


class _Reached(Exception):
    """Raised by the hook on the first decoder layer once its inputs are captured."""


def _first_layer_inputs(model: nn.Module, first: nn.Module, batches: list[Tensor]) -> list[list]:
    """Per batch [hidden states, positional args, keyword args] entering the first decoder layer."""
    captured = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append([hidden, tuple(args[1:]), kwargs])
        raise _Reached

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(input_ids=batch, use_cache=False)
            except _Reached:
                pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise QbaraError("the model never called its first decoder layer; GPTQ needs a decoder-only causal LM")
    return captured


def _run_layer(layer: nn.Module, states: list[list], keep: bool) -> None:
    """Run every batch through `layer`; with `keep`, its outputs replace the stored hidden states."""
    for state in states:
        out = layer(state[0], *state[1], **state[2])
        if keep:
            state[0] = out[0] if isinstance(out, (tuple, list)) else out


def _collect_hessians(layer: nn.Module, linears: Mapping[str, nn.Module], states: list[list]) -> dict[str, Tensor]:
    """name -> H = 2/n Σ x xᵀ of each linear's inputs, from forward hooks; linears fed the very same tensor
    (q/k/v, gate/up) share one."""
    sums: dict[str, list] = {}
    shared: dict[str, str] = {}
    seen: dict[int, tuple[Tensor, str]] = {}  # inputs of this batch by id (the tensor is kept, so ids stay unique)

    def hook_for(name):
        def hook(module, args, output):
            x = args[0]
            first = seen.get(id(x))
            if first is not None and first[0] is x:
                shared.setdefault(name, first[1])
                return
            seen[id(x)] = (x, name)
            sums[name] = list(hessian_accumulate(*sums.get(name, (None, 0)), x))
        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in linears.items()]
    try:
        for state in states:
            seen.clear()
            _run_layer(layer, [state], keep=False)
    finally:
        for handle in handles:
            handle.remove()
        seen.clear()
    return {name: sums[shared.get(name, name)][0] for name in linears}


def _walk_layers(model, layers, prefix, owned, per_layer, states, report: GPTQReport, options: dict,
                 progress: bool) -> None:
    """Quantize decoder layer after decoder layer, feeding each quantized layer's outputs to the next."""
    bar = tqdm(range(len(layers)), desc="GPTQ", unit="layer", disable=not progress, leave=False)
    for i in bar:
        names = owned[i]
        if names:
            linears = {n: model.get_submodule(n) for n in names}
            hessians = _collect_hessians(layers[i], linears, states)
            for name in names:
                report.layers[name] = _quantize_linear(model, name, linears[name], per_layer[name],
                                                       hessians[name], options)
            del hessians, linears
            bar.set_postfix(error_vs_rtn=f"{report.error_ratio:.3f}")
        if i + 1 < len(layers) and any(owned[i + 1:]):
            _run_layer(layers[i], states, keep=True)


def _quantize_linear(model, name: str, linear: nn.Module, config: QuantConfig, hessian: Tensor,
                     options: dict) -> dict:
    """Replace `linear` by a QuantizedLinear holding its GPTQ quantization; return its report entry."""
    weight = linear.weight.detach()
    qtensor = gptq_quantize(weight, hessian, config, name=name, **options)
    entry = {"config": config.label, "gptq_error": output_error(weight, qtensor.dequantize(), hessian),
             "rtn_error": output_error(weight, quantize(weight, config, name).dequantize(), hessian)}
    set_submodule(model, name, QuantizedLinear(qtensor, linear.bias))
    return entry
