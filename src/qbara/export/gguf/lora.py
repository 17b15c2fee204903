"""`export_gguf_lora`: plain LoRA adapters as the LoRA GGUF llama.cpp loads with `--lora` beside the base.

llama.cpp adds scale · B (A x) with scale = alpha / rank per `<base tensor>.lora_a` / `.lora_b` pair; the file's
alpha is the most common s · r, and a layer whose s · r differs has the ratio folded into its B. B's rows of
attn_q / attn_k follow the base's rotary row order.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFValueType, LlamaFileType
from gguf.constants import Keys
from torch import nn

from qbara.adapters.attach import adapter_layers
from qbara.errors import QbaraError
from qbara.export.gguf.architectures import ARCHITECTURES, Architecture
from qbara.export.gguf.base import write_file
from qbara.export.gguf.checks import check_architecture, check_path
from qbara.export.gguf.linears import is_plain_lora, row_order
from qbara.export.gguf.provenance import base_model_fields, model_name
from qbara.outputs import GGUF_MARK, output_file
from qbara.quant.ggml import FP16_MAX

_MERGE_HINT = ("merge them into the base instead: qbara.merge(model, into='quantized') and export_gguf (or "
              "export_gguf alone, which merges them on the fly; CLI: qbara export --format gguf without a "
              "separate adapter)")


@dataclass
class LoraExportReport:
    """What `export_gguf_lora` wrote; rescaled: layers whose s · r differs from alpha (factor folded into B)."""

    path: Path
    size_bytes: int
    alpha: float
    ranks: dict[str, int] = field(default_factory=dict)
    rescaled: list[str] = field(default_factory=list)
    tensor_names: list[str] = field(default_factory=list)
    seconds: float = 0.0
    dtype: str = "f32"

    def summary(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        lines = [(f"wrote LoRA adapter {self.path} ({self.size_bytes / 1e6:.2f} MB, {len(self.ranks)} layers, "
                  f"rank {'/'.join(map(str, ranks))}, alpha {self.alpha:g}, {self.dtype.upper()}) in "
                  f"{self.seconds:.1f} s; load it "
                  f"with llama.cpp's --lora beside the base GGUF")]
        if self.rescaled:
            lines.append(f"{len(self.rescaled)} layers have another scaling; it is folded into their lora_b")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ checks
def _lora_layers(model: nn.Module, arch: Architecture) -> dict[str, tuple[int, str, nn.Module]]:
    """HF name -> (block, llama.cpp tensor name, adapter); refuses what a LoRA GGUF cannot hold (pooled
    methods, layers outside the decoder blocks' linears)."""
    adapters = adapter_layers(model)
    if not adapters:
        raise QbaraError("this model has no adapters to write as a LoRA GGUF; attach LoRA adapters with "
                         "qbara.prepare(..., adapter=AdapterConfig('lora', ...)) or qbara.load_adapter, or "
                         "export the model alone with export_gguf")
    places = {f"model.layers.{i}.{slot.hf}": (i, slot.gguf)
              for i in range(len(model.model.layers)) for slot in arch.linears}
    elsewhere = sorted(n for n in adapters if n not in places)
    if elsewhere:
        covered = "/".join(slot.hf.rsplit(".", 1)[-1] for slot in arch.linears)
        raise QbaraError(f"adapters on {', '.join(elsewhere[:3])} have no place in a llama.cpp LoRA GGUF, which "
                         f"covers the decoder blocks' linears ({covered}); {_MERGE_HINT}")
    pooled = {n: a for n, a in adapters.items() if not is_plain_lora(a)}
    if pooled:
        first = next(iter(pooled.values()))
        raise QbaraError(f"{len(pooled)} adapter layers are {first.method} (input pooling {first.pool_in}, output "
                         f"repetition {first.pool_out}; e.g. {next(iter(pooled))}), not plain LoRA: a llama.cpp "
                         f"LoRA GGUF holds s·B·A on the full layer only; {_MERGE_HINT}")
    return {n: (*places[n], a) for n, a in adapters.items()}


# ------------------------------------------------------------------------------------ tensors
def _file_alpha(layers) -> float:
    """adapter.lora.alpha: the most common s · r of the layers (as float32, what llama.cpp reads)."""
    counts = Counter(float(np.float32(a.scaling * a.rank)) for _, _, a in layers)
    return max(counts, key=lambda k: (counts[k], k))


def _llama_scale(alpha: float, rank: int) -> float:
    """The scale llama.cpp applies to B A at user scale 1 (llama_adapter_lora_weight::get_scale)."""
    return float(np.float32(alpha) / np.float32(rank)) if alpha else 1.0


_LORA_DTYPES = {"f32": np.float32, "f16": np.float16}  # the adapter tensor types llama.cpp's --lora reads here


@torch.no_grad()
def _lora_tensors(name: str, gguf_name: str, adapter, config, alpha: float,
                 dtype: str = "f32", arch: Architecture | None = None) -> tuple[list[tuple], bool]:
    """([(…lora_a, A), (…lora_b, B)] as `dtype`, whether B absorbed a scaling other than alpha / r)."""
    a = adapter.lora_A.weight.detach().to("cpu", torch.float32)
    b = adapter.lora_B.weight.detach().to("cpu", torch.float64)
    factor = adapter.scaling / _llama_scale(alpha, adapter.rank)
    rescaled = abs(factor - 1.0) > 1e-6
    if rescaled:
        b = b * factor
    perm = row_order(b.shape[0], (arch or ARCHITECTURES["llama"]).rope_heads(gguf_name, config))
    if perm is not None:
        b = b[perm]
    base = f"{name}.weight"
    pair = [(f"{base}.lora_a", a.contiguous().numpy()), (f"{base}.lora_b", b.to(torch.float32).contiguous().numpy())]
    if dtype == "f16":
        for tensor_name, values in pair:
            top = float(np.abs(values).max()) if values.size else 0.0
            if top > FP16_MAX:
                raise QbaraError(f"{tensor_name} reaches {top:.3g}, beyond fp16's range: write the adapter as f32 "
                                 f"(lora_dtype='f32', CLI --lora-dtype f32)")
    return [(n, v.astype(_LORA_DTYPES[dtype]), None) for n, v in pair], rescaled


# ------------------------------------------------------------------------------------ writer
def export_gguf_lora(model: nn.Module, path, *, name: str | None = None, overwrite: bool = False,
                     base_model: str | None = None, adapter: str | None = None,
                     dtype: str = "f32") -> LoraExportReport:
    """Check and lock the output `path` (as `export_gguf` does), then `write_gguf_lora`."""
    with output_file(check_path(path), overwrite=overwrite, option="path"):
        return write_gguf_lora(model, path, name=name, base_model=base_model, adapter=adapter, dtype=dtype)


def write_gguf_lora(model: nn.Module, path, *, name: str | None = None, base_model: str | None = None,
                    adapter: str | None = None, dtype: str = "f32") -> LoraExportReport:
    """Write the model's plain LoRA adapters as a llama.cpp LoRA GGUF at `path` ("f32" or "f16" tensors, names
    as the base's: blk.N.attn_q.weight.lora_a, ...); pair it with export_gguf(..., separate_lora=True). Pooled
    adapters are refused (merge them instead); base_model, adapter: provenance as the user named them."""
    start = time.perf_counter()
    if dtype not in _LORA_DTYPES:
        raise QbaraError(f"the LoRA GGUF's tensors are {' or '.join(_LORA_DTYPES)}, got dtype={dtype!r}")
    path = check_path(path)
    arch = check_architecture(model)
    layers = _lora_layers(model, arch)
    alpha = _file_alpha(layers.values())
    tensors, ranks, rescaled = [], {}, []
    order = [slot.gguf for slot in arch.linears]
    for hf_name, (i, gguf_name, layer) in sorted(layers.items(), key=lambda kv: (kv[1][0], order.index(kv[1][1]))):
        pair, scaled = _lora_tensors(f"blk.{i}.{gguf_name}", gguf_name, layer, model.config, alpha, dtype, arch)
        tensors += pair
        ranks[hf_name] = layer.rank
        if scaled:
            rescaled.append(hf_name)

    def header(writer) -> None:
        writer.add_type("adapter")
        writer.add_name(model_name(model, name, base_model, what="qbara LoRA adapter"))
        if base_model:
            for key, (value, vtype, sub_type) in base_model_fields(base_model).items():
                writer.add_key_value(key, value, vtype, sub_type=sub_type)
        what = " for ".join(x for x in (f"LoRA adapter {adapter}" if adapter else "LoRA adapter",
                                        f"base model {base_model}" if base_model else "") if x)
        writer.add_key_value("general.description", f"{what}; exported by qbara", GGUFValueType.STRING)
        file_type = LlamaFileType.ALL_F32 if dtype == "f32" else LlamaFileType.MOSTLY_F16
        writer.add_uint32("general.file_type", int(file_type))
        writer.add_string(Keys.Adapter.TYPE, "lora")
        writer.add_float32(Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_string("general.quantized_by", GGUF_MARK)  # how qbara.outputs knows its own files

    write_file(path, header, tensors, arch.gguf_arch)
    return LoraExportReport(path=path, size_bytes=path.stat().st_size, alpha=alpha, ranks=ranks,
                            rescaled=rescaled, tensor_names=[n for n, _, _ in tensors],
                            seconds=time.perf_counter() - start, dtype=dtype)

