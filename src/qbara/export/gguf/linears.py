"""The linear layers of a decoder block as GGUF tensors: resolved (exact codes, or a dense weight to
re-quantize), laid out in llama.cpp's rotary row order, and packed as GGML block bytes."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from qbara.adapters.base import AdaptedLinear
from qbara.adapters.lora import LoRALinear
from qbara.errors import QbaraError
from qbara.export.gguf.architectures import ARCHITECTURES
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.quant.config import QuantConfig
from qbara.quant.tensor import QuantizedTensor, quantize

Q4_1_CONFIG = QuantConfig("int4", block_size=32)
Q5_1_CONFIG = QuantConfig("int5", block_size=32)

# LLaMA's decoder-block linears and norms (HF submodule, llama.cpp name).
LINEARS = tuple((slot.hf, slot.gguf) for slot in ARCHITECTURES["llama"].linears)
NORMS = tuple((slot.hf, slot.gguf) for slot in ARCHITECTURES["llama"].norms)
# Float types a dense linear layer can be written as (dense_type=): exact in F32, rounded to nearest in F16.
DENSE_TYPES = ("f32", "f16")

FIX_HINT = ("quantize the base with QuantConfig('int4', block_size=32) or QuantConfig('int5', block_size=32) "
            "(fp16 minima, the default; written as GGUF Q4_1 / Q5_1) and train qahira or qalora adapters "
            "(they merge into it exactly), or with a gguf:* block format (e.g. QuantConfig('gguf:q4_k'), written "
            "as its own blocks); or pass lossy=True (CLI: --allow-requantize) to re-quantize to "
            "INT4 G32 (GGUF Q4_1; INT5 bases to Q5_1) and report the error it introduces; or pass "
            "dense_type='f32' (exact) or 'f16' to write those layers unquantized")
_LORA_HINT = ("A plain LoRA adapter can instead go out as a llama.cpp LoRA GGUF beside the base: "
             "export_gguf(..., separate_lora=True) and export_gguf_lora (qbara export --format gguf does this "
             "without --allow-requantize)")


# ------------------------------------------------------------------------------------ row layout
def llama_rope_permutation(rows: int, n_head: int) -> Tensor:
    """Row order of llama.cpp's q/k layout: GGUF row r holds HF row perm[r]. HF rotates pairs (j, j + head_dim/2),
    llama.cpp adjacent pairs (2j, 2j + 1): within a head GGUF row 2j + i is HF row i * head_dim/2 + j. Rows
    move whole, so quantization blocks stay intact."""
    if rows % (2 * n_head):
        raise QbaraError(f"cannot lay out {rows} rows as {n_head} rotary heads")
    half = rows // n_head // 2
    return torch.arange(rows).reshape(n_head, 2, half).transpose(1, 2).reshape(-1)


# ------------------------------------------------------------------------------------ layer kinds
def _is_exact(module: nn.Module) -> bool:
    """A quantized layer whose format family writes it to GGUF exactly."""
    config = getattr(module, "quant_config", None)
    return isinstance(module, QuantizedLinear) and config.family.gguf_format(config) is not None


def is_plain_lora(module: nn.Module) -> bool:
    """An adapter whose update is s · B A on the full layer (no pooling): what a llama.cpp LoRA GGUF holds."""
    return isinstance(module, LoRALinear) and module.pool_in == 1 and module.pool_out == 1


def _describe(module: nn.Module) -> str:
    if isinstance(module, QuantizedLinear):
        return module.quant_config.label
    if isinstance(module, nn.Linear):
        return "dense"
    return type(module).__name__


# ------------------------------------------------------------------------------------ resolution
@dataclass
class Linear:
    """One linear layer as it will be written."""

    name: str                      # HF module name
    qtensor: QuantizedTensor | None = None   # exact: INT4 / INT5 G32 codes or gguf:* blocks
    dense: Tensor | None = None    # to re-quantize (lossy)
    what: str = ""                 # what it was, for messages
    requant: QuantConfig = Q4_1_CONFIG       # the format a lossy re-quantization writes
    merged: bool = False           # an adapter was merged into it
    separate: bool = False         # its plain LoRA adapter was left out (for export_gguf_lora)
    bias: Tensor | None = None     # written as <name>.bias (F32) where the architecture has one


def _unwrap_adapter(name: str, module: nn.Module, lossy: bool, separate_lora: bool,
                    dense: bool = False) -> tuple[nn.Module, str]:
    """The layer to write for an adapted layer, and "merged" or "separate"."""
    if separate_lora and is_plain_lora(module):
        return module.base, "separate"
    problem = module.fold_problem()
    if problem is None:
        return module.merge("quantized"), "merged"
    if lossy or dense:
        return module.merge("dense"), "merged"
    lora = f" {_LORA_HINT}" if is_plain_lora(module) else ""
    raise QbaraError(f"{name}: its {module.method} adapter cannot merge into the quantized base "
                     f"({problem}), so the layer cannot be written to GGUF exactly. Either {FIX_HINT}.{lora}")


def resolve_linear(name: str, module: nn.Module, lossy: bool, separate_lora: bool = False, *,
                   bias_ok: bool = False, arch: str = "llama", dense: bool = False) -> Linear:
    """The layer as exact codes or a dense weight (to re-quantize, or to write as floats when `dense`)."""
    how = ""
    base_config = getattr(module, "quant_config", None)
    if isinstance(module, AdaptedLinear):
        module, how = _unwrap_adapter(name, module, lossy, separate_lora, dense)
    bias = getattr(module, "bias", None)
    if bias is not None and not bias_ok:
        raise QbaraError(f"{name} has a bias, which llama.cpp's {arch} does not read; use export_hf instead")
    item = Linear(name, what=_describe(module), requant=_requant_config(base_config), merged=how == "merged",
                  separate=how == "separate", bias=None if bias is None else bias.detach().float().cpu())
    if _is_exact(module):
        item.qtensor = module.qweight
    elif isinstance(module, QuantizedLinear):
        item.dense = module.dequantize(torch.float32)
    elif isinstance(module, nn.Linear):
        item.dense = module.weight.detach().float()
    else:
        raise QbaraError(f"{name}: cannot export a {type(module).__name__} as a GGUF linear layer")
    return item


def _requant_config(base: QuantConfig | None) -> QuantConfig:
    """What a lossy export re-quantizes into: a gguf:* base's own format, Q5_1 for an INT5 base, else Q4_1."""
    if base is not None and base.family.stores_gguf_blocks:
        return base
    return Q5_1_CONFIG if base is not None and base.format == Q5_1_CONFIG.format else Q4_1_CONFIG


def refuse_inexact(items: list[Linear], dense: bool = False) -> None:
    """Refuse, naming them, the layers that would need re-quantizing (none when `dense`)."""
    if dense:
        return
    inexact = [item for item in items if item.qtensor is None]
    if not inexact:
        return
    kinds = sorted({item.what for item in inexact})
    names = ", ".join(item.name for item in inexact[:3])
    more = f" and {len(inexact) - 3} more" if len(inexact) > 3 else ""
    raise QbaraError(f"{len(inexact)} linear layers are neither INT4 / INT5 with block size 32 (fp16 minima) "
                     f"nor a gguf:* block format ({', '.join(kinds)}: {names}{more}), so they cannot be written to "
                     f"GGUF losslessly. To export, {FIX_HINT}")


def requantize(item: Linear) -> tuple[float, float]:
    """Re-quantize a dense layer into `item.requant` in place: (‖W - Q(W)‖², ‖W‖²)."""
    item.qtensor = quantize(item.dense, item.requant, name=item.name)
    diff = float((item.dense - item.qtensor.dequantize(torch.float32)).norm()) ** 2
    ref = float(item.dense.norm()) ** 2
    item.dense = None
    return diff, ref


# ------------------------------------------------------------------------------------ bytes
def row_order(rows: int, perm_heads: int | None) -> Tensor | None:
    """The rows' order in the file: llama.cpp's rotary order for `perm_heads` heads, else None (as they are)."""
    return None if perm_heads is None else llama_rope_permutation(rows, perm_heads)


def dense_array(item: Linear, perm_heads: int | None, kind: str) -> np.ndarray:
    """A dense layer's weight as `kind` ("f32" / "f16"), rows in the file's order."""
    weight = item.dense
    perm = row_order(weight.shape[0], perm_heads)
    if perm is not None:
        weight = weight[perm]
    return weight.to(torch.float16 if kind == "f16" else torch.float32).contiguous().numpy()


def linear_bytes(item: Linear, perm_heads: int | None) -> tuple[np.ndarray, object]:
    """((d_out, row bytes) uint8 GGML blocks, GGMLQuantizationType) of an exact layer, rows in the file's order."""
    config = item.qtensor.config
    fmt = config.family.gguf_format(config)
    if fmt is None:
        raise QbaraError(f"{item.name}: {config.label} has no GGUF block layout to write exactly; {FIX_HINT}")
    raw = config.family.gguf_blocks(item.qtensor, item.name)
    if perm_heads is not None:
        raw = raw[llama_rope_permutation(raw.shape[0], perm_heads).to(raw.device)]
    return np.ascontiguousarray(raw.to("cpu").numpy()), fmt.ggml_type
