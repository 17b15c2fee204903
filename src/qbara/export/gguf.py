"""Export a (merged) LLaMA-architecture model as a GGUF file llama.cpp and transformers can load.

Linear layers quantized with INT4, group 32 (`QuantConfig("int4", 32)`, the format QA-LoRA and QA-HiRA
merge into exactly) are written as GGUF Q4_1 by packing qbara's own codes, fp16 scales and fp16 minima
into the Q4_1 block layout: the file holds bit for bit the weights of the merged model. The token
embedding (and an untied output matrix) are written as Q8_0 by default, as in the shipped SmolLM2
file; norms as F32.

Anything else (NF4 or other INT layouts, dense layers, adapters that do not fold) can only be written
by re-quantizing to INT4 G32: that needs `lossy=True` (CLI: `--allow-requantize`) and the report
states the relative weight error it introduced.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from qbara.atomic import write_file_atomic
from qbara.outputs import GGUF_MARK
from qbara.errors import QbaraError
from qbara.export.blocks import dequantize_q8_0, pack_q4_1, pack_q8_0, quantize_q8_0
from qbara.export.tokenizer import TokenizerFields, fields_from_gguf, fields_from_hf, shipped_smollm2_reader
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.quant.config import QuantConfig
from qbara.quant.tensor import QuantizedTensor, quantize

ARCH = "llama"
Q4_1_CONFIG = QuantConfig("int4", block_size=32)
EMBEDDING_TYPES = ("q8_0", "f16", "f32")

# HF submodule of a decoder layer -> llama.cpp tensor name (without "blk.N." and ".weight").
LINEARS = (
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
)
NORMS = (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"))

FIX_HINT = ("quantize the base with QuantConfig('int4', block_size=32) (fp16 minima, the default) and train "
            "qahira or qalora adapters "
            "(they merge into it exactly); or pass lossy=True (CLI: --allow-requantize) to re-quantize to "
            "INT4 G32 (GGUF Q4_1) and report the error it introduces")


@dataclass
class ExportReport:
    """What `export_gguf` wrote, and how faithful it is.

    exact_q4_1: linear layers written from their own INT4 G32 codes (bit-exact).
    requantized: linear layers re-quantized to INT4 G32 (only with lossy=True).
    requantize_error: relative Frobenius error ||W - Q(W)|| / ||W|| over all re-quantized weights
        together (0.0 when nothing was re-quantized); max_layer_error: the worst single layer.
    embedding_error: the same for token_embd (and output) in `embedding_type` (0.0 when the embedding
        already lies on the Q8_0 grid, as for SmolLM2, or for f32).
    """

    path: Path
    size_bytes: int
    tensor_types: dict[str, str]
    exact_q4_1: list[str] = field(default_factory=list)
    requantized: list[str] = field(default_factory=list)
    requantize_error: float = 0.0
    max_layer_error: float = 0.0
    embedding_type: str = "q8_0"
    embedding_error: float = 0.0
    adapters_merged: int = 0
    tokenizer_source: str = ""
    provenance: dict[str, object] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def lossless(self) -> bool:
        """True when every linear layer was written from its own codes (no re-quantization)."""
        return not self.requantized

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for kind in self.tensor_types.values():
            counts[kind] = counts.get(kind, 0) + 1
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        lines = [f"wrote {self.path} ({self.size_bytes / 1e6:.1f} MB, {len(self.tensor_types)} tensors: {kinds}) "
                 f"in {self.seconds:.1f} s"]
        if self.adapters_merged:
            lines.append(f"merged {self.adapters_merged} adapter layers")
        if self.requantized:
            lines.append(f"LOSSY: re-quantized {len(self.requantized)} linear layers to Q4_1, relative weight "
                         f"error {self.requantize_error:.3e} (worst layer {self.max_layer_error:.3e})")
        else:
            lines.append(f"lossless: {len(self.exact_q4_1)} linear layers packed from their INT4 G32 codes")
        lines.append(f"token embedding {self.embedding_type}, relative error {self.embedding_error:.3e}; "
                     f"tokenizer {self.tokenizer_source}")
        if "general.description" in self.provenance:
            license_ = self.provenance.get("general.license")
            lines.append(f"provenance: {self.provenance['general.description']}" +
                         (f"; license {license_}" if license_ else ""))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- checks
def check_llama(model: nn.Module) -> None:
    """Raise a QbaraError unless `model` is a LLaMA-architecture causal LM that llama.cpp's `llama` runs."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type != "llama" or not hasattr(getattr(model, "model", None), "layers"):
        raise QbaraError(f"GGUF export supports LLaMA-architecture models (model_type 'llama', e.g. SmolLM2); "
                         f"this model is {model_type or type(model).__name__!r}. Use export_hf (qbara export "
                         f"--format hf) for other architectures")
    problems = []
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("linear biases (attention_bias / mlp_bias)")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"activation {config.hidden_act!r} (llama.cpp's llama uses silu)")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in (None, "default"):
        problems.append(f"rope scaling {rope_type!r}")
    if problems:
        raise QbaraError(f"GGUF export writes plain LLaMA models; this one has {', '.join(problems)}, which the "
                         f"exporter does not write. Use export_hf (qbara export --format hf) instead")


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def _head_dim(config) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def _check_path(path) -> Path:
    path = Path(path).expanduser()
    if path.suffix.lower() != ".gguf":
        raise QbaraError(f"GGUF output path {str(path)!r} must end in .gguf (e.g. model.gguf)")
    if path.is_dir():
        raise QbaraError(f"GGUF output path {str(path)!r} is a directory; give a file name such as "
                         f"{str(path / 'model.gguf')!r}")
    return path


# ------------------------------------------------------------------------------------------ linears
def llama_rope_permutation(rows: int, n_head: int) -> Tensor:
    """Row order of llama.cpp's q/k layout: GGUF row r holds HF row perm[r].

    transformers' LLaMA rotates the pairs (j, j + head_dim/2) of each head; llama.cpp's rotates
    adjacent pairs (2j, 2j + 1). So within each head GGUF row 2j + i is HF row i * head_dim/2 + j.
    Rows move whole, so every 1 x 32 block along a row stays intact.
    """
    if rows % (2 * n_head):
        raise QbaraError(f"cannot lay out {rows} rows as {n_head} rotary heads")
    half = rows // n_head // 2
    return torch.arange(rows).reshape(n_head, 2, half).transpose(1, 2).reshape(-1)


def _is_q4_1(module: nn.Module) -> bool:
    c = getattr(module, "quant_config", None)
    return (isinstance(module, QuantizedLinear) and c is not None and c.format == "int4"
            and c.block_size == 32 and c.block_rows == 1 and c.minimum_dtype == "fp16")


def _describe(module: nn.Module) -> str:
    if isinstance(module, QuantizedLinear):
        return module.quant_config.label
    if isinstance(module, nn.Linear):
        return "dense"
    return type(module).__name__


@dataclass
class _Linear:
    name: str                      # HF module name
    qtensor: QuantizedTensor | None = None   # exact INT4 G32
    dense: Tensor | None = None    # to re-quantize (lossy)
    what: str = ""                 # what it was, for messages


def _resolve_linear(name: str, module: nn.Module, lossy: bool) -> tuple[_Linear, bool]:
    """The layer as an exact INT4 G32 tensor or a dense weight to re-quantize; (layer, adapter merged)."""
    from qbara.adapters.base import AdaptedLinear

    merged = False
    if isinstance(module, AdaptedLinear):
        problem = module.fold_problem()
        if problem is None:
            module = module.merge("quantized")
        elif lossy:
            module = module.merge("dense")
        else:
            raise QbaraError(f"{name}: its {module.method} adapter cannot merge into the quantized base "
                             f"({problem}), so the layer cannot be written as Q4_1 exactly. Either "
                             f"{FIX_HINT}")
        merged = True
    if getattr(module, "bias", None) is not None:
        raise QbaraError(f"{name} has a bias, which llama.cpp's llama does not read; use export_hf instead")
    if _is_q4_1(module):
        return _Linear(name, qtensor=module.qweight, what=module.quant_config.label), merged
    if isinstance(module, QuantizedLinear):
        return _Linear(name, dense=module.dequantize(torch.float32), what=_describe(module)), merged
    if isinstance(module, nn.Linear):
        return _Linear(name, dense=module.weight.detach().float(), what="dense"), merged
    raise QbaraError(f"{name}: cannot export a {type(module).__name__} as a GGUF linear layer")


def _q4_1_bytes(layer: _Linear, perm_heads: int | None) -> np.ndarray:
    qt = layer.qtensor
    d_out, d_in = qt.shape
    codes = qt.codes().reshape(d_out, d_in)
    scale = _as_fp16(qt.tensors["scale"], layer.name).reshape(d_out, d_in // 32)
    minimum = _as_fp16(qt.tensors["minimum"], layer.name).reshape(d_out, d_in // 32)
    if perm_heads is not None:
        perm = llama_rope_permutation(d_out, perm_heads).to(codes.device)
        codes, scale, minimum = codes[perm], scale[perm], minimum[perm]
    return pack_q4_1(codes, scale, minimum, (d_out, d_in))


def _as_fp16(values: Tensor, name: str) -> Tensor:
    """Scales / minima as fp16 (Q4_1 stores fp16); refuses values that fp16 cannot hold exactly
    (they were cast, e.g. by model.to(torch.bfloat16), to a type with a wider range)."""
    if values.dtype == torch.float16:
        return values
    half = values.to(torch.float16)
    if not torch.equal(half.to(values.dtype), values):
        raise QbaraError(f"{name}: its {values.dtype} scales or minima are not exact in fp16, so the layer "
                         f"cannot be written as Q4_1 exactly; keep QuantizedLinear buffers in fp16 (do not "
                         f"cast the quantized model) or pass lossy=True")
    return half


# ---------------------------------------------------------------------------------------- embedding
def _float_tensor(name: str, weight: Tensor, kind: str) -> tuple[np.ndarray, object, float]:
    """(array, raw GGML type or None, relative error) for a float matrix written as `kind`."""
    from gguf import GGMLQuantizationType

    w = weight.detach().to("cpu", torch.float32)
    if kind == "q8_0":
        if w.shape[-1] % 32:
            raise QbaraError(f"{name}: Q8_0 needs a row length divisible by 32 (got {w.shape[-1]}); "
                             f"use embedding_type='f16' or 'f32'")
        codes, d = quantize_q8_0(w)
        err = _rel_error(w, dequantize_q8_0(codes, d))
        return pack_q8_0(codes, d), GGMLQuantizationType.Q8_0, err
    if kind == "f16":
        arr = w.to(torch.float16)
        return arr.numpy(), None, _rel_error(w, arr.float())
    return w.contiguous().numpy(), None, 0.0


def _rel_error(reference: Tensor, approx: Tensor) -> float:
    norm = float(reference.norm())
    return float((reference - approx).norm()) / norm if norm > 0 else 0.0


# ------------------------------------------------------------------------------------------- writer
def _model_name(model, name: str | None, base_model: str | None = None) -> str:
    if name:
        return name
    source = getattr(model.config, "_name_or_path", "") or base_model or ""
    return (Path(source).name or source or "qbara-model") + " (qbara export)"


def _source_gguf(tokenizer, tokenizer_gguf):
    """(path, reader) of the GGUF the tokenizer metadata is copied from: `tokenizer_gguf`, or the shipped
    SmolLM2 file when the tokenizer is SmolLM2's; None when it is built from the tokenizer itself."""
    if tokenizer_gguf is not None:
        from gguf import GGUFReader

        return Path(tokenizer_gguf), GGUFReader(str(tokenizer_gguf))
    return shipped_smollm2_reader(tokenizer)


def _tokenizer_fields(tokenizer, vocab_size: int, source) -> TokenizerFields:
    if source is not None:
        return fields_from_gguf(*source)
    return fields_from_hf(tokenizer, vocab_size)


# ------------------------------------------------------------------------------------- provenance
def _general_keys():
    """gguf-py's standard `general.*` keys: (exact names, patterns for the `{id}` ones)."""
    from gguf.constants import Keys

    names = [v for k, v in vars(Keys.General).items() if k.isupper() and isinstance(v, str)]
    exact = {n for n in names if "{id}" not in n}
    patterns = [re.compile(re.escape(n).replace(re.escape("{id}"), r"\d+") + r"\Z") for n in names if "{id}" in n]
    return exact, patterns


# Set by the writer for this file (general.quantized_by marks the files qbara wrote).
WRITER_GENERAL = ("general.name", "general.type", "general.architecture", "general.file_type",
                  "general.quantization_version", "general.alignment", "general.quantized_by")
# Describe the source model: recorded as general.base_model.0.* (author and organization are kept as the
# exported model's too; the SOURCE_ONLY ones name that very file, so they are not).
SOURCE_TO_BASE = {"general.author": "author", "general.organization": "organization", "general.version": "version",
                  "general.description": "description", "general.url": "url", "general.doi": "doi",
                  "general.uuid": "uuid", "general.repo_url": "repo_url"}
SOURCE_ONLY = ("general.version", "general.description", "general.url", "general.doi", "general.uuid",
               "general.repo_url")
# Shapes that must agree before a GGUF's general.* metadata is taken to describe the exported model.
SHAPE_KEYS = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
              "attention.head_count_kv")


def _field(reader, key):
    from gguf import GGUFValueType

    fld = reader.fields[key]
    vtype = fld.types[0]
    return fld.contents(), vtype, (fld.types[-1] if vtype == GGUFValueType.ARRAY else None)


def same_model(reader, config, vocab_size: int) -> bool:
    """True when the GGUF in `reader` holds a LLaMA model of `config`'s shape and vocabulary (the model
    exported is that model, fine-tuned): only then is its general.* metadata carried over."""
    fields = reader.fields
    try:
        if fields["general.architecture"].contents() != ARCH:
            return False
        want = (config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                config.num_attention_heads, config.num_key_value_heads)
        have = tuple(int(fields[f"{ARCH}.{k}"].contents()) for k in SHAPE_KEYS)
        tokens = len(fields["tokenizer.ggml.tokens"].contents())
    except (KeyError, AttributeError, TypeError, ValueError):
        return False
    return have == tuple(int(w) for w in want) and tokens == vocab_size


def provenance_fields(source, base_model: str | None, adapter: str | None, *, config=None,
                      vocab_size: int | None = None) -> dict[str, tuple]:
    """general.* metadata for the exported file: key -> (value, GGUF type, array item type).

    From `source` ((path, reader) of the GGUF the tokenizer came from), when it holds this very model
    (`same_model`: same shapes and vocabulary): its standard general.* keys (license, basename, organization,
    size_label, finetune, tags, languages, datasets, ...), except those the writer sets (WRITER_GENERAL) and
    those that name that file (url, doi, uuid, repo_url, version, description, source.*, base_model.*),
    which describe the base model here: they become general.base_model.0.*.
    qbara's own: general.base_model.count = 1, general.base_model.0.name = `base_model` (else the source
    file's general.name), and general.description naming the base model and the adapter merged into it.
    """
    from gguf import GGUFValueType

    out: dict[str, tuple] = {}
    base: dict[str, tuple] = {}
    reader = None
    if source is not None and (config is None or same_model(source[1], config, vocab_size)):
        reader = source[1]
    if reader is not None:
        exact, patterns = _general_keys()
        for key in reader.fields:
            if key in WRITER_GENERAL or not (key in exact or any(p.match(key) for p in patterns)):
                continue
            if key.startswith(("general.base_model.", "general.source.")):
                continue
            if key in SOURCE_TO_BASE:
                base[SOURCE_TO_BASE[key]] = _field(reader, key)
            if key not in SOURCE_ONLY:
                out[key] = _field(reader, key)
        for attr in ("url", "repo_url", "doi", "uuid"):  # the source file's own source, when it names none
            if attr not in base and f"general.source.{attr}" in reader.fields:
                base[attr] = _field(reader, f"general.source.{attr}")
    name = base_model
    if name is None and reader is not None and "general.name" in reader.fields:
        name = str(reader.fields["general.name"].contents())
    if name is not None:
        out["general.base_model.count"] = (1, GGUFValueType.UINT32, None)
        out["general.base_model.0.name"] = (str(name), GGUFValueType.STRING, None)
        for attr, value in base.items():
            out[f"general.base_model.0.{attr}"] = value
    if name is not None or adapter:
        what = " with ".join(x for x in (f"base model {name}" if name is not None else "",
                                         f"the adapter {adapter} merged" if adapter else "") if x)
        out["general.description"] = (f"{what}; exported by qbara", GGUFValueType.STRING, None)
    return out


def export_gguf(model: nn.Module, tokenizer, path, lossy: bool = False, *, embedding_type: str = "q8_0",
                tokenizer_gguf=None, name: str | None = None, overwrite: bool = False,
                base_model: str | None = None, adapter: str | None = None) -> ExportReport:
    """Check and lock the output `path` (`qbara.outputs`: an existing file qbara did not write is refused
    unless overwrite=True), then `write_gguf`."""
    from qbara.outputs import output_file

    with output_file(_check_path(path), overwrite=overwrite, option="path"):
        return write_gguf(model, tokenizer, path, lossy, embedding_type=embedding_type,
                          tokenizer_gguf=tokenizer_gguf, name=name, base_model=base_model, adapter=adapter)


@torch.no_grad()
def write_gguf(model: nn.Module, tokenizer, path, lossy: bool = False, *, embedding_type: str = "q8_0",
               tokenizer_gguf=None, name: str | None = None, base_model: str | None = None,
               adapter: str | None = None) -> ExportReport:
    """Write a LLaMA-architecture model as a GGUF file (llama.cpp `llama`, Q4_1 linears) at `path`.

    model: a LlamaForCausalLM whose linears are qbara QuantizedLinear INT4 G32 layers, ideally after
        `qbara.merge(model, into="quantized")`. Adapter layers still attached are merged on the fly
        (the model itself is not modified) when they fold into the quantized base.
    tokenizer: its Hugging Face tokenizer (byte-level BPE). When it is SmolLM2's, the `tokenizer.*`
        metadata is copied from the shipped SmolLM2 GGUF; `tokenizer_gguf` names another GGUF file to
        copy it from; otherwise it is built from the tokenizer (vocabulary, merges, special tokens,
        chat template).
    path: the .gguf file to write (parent folders are created; written to a temporary file and renamed).
    lossy: allow re-quantizing layers that are not INT4 G32 (NF4, other INT layouts, dense, adapters
        that do not fold); without it such a model is refused with a QbaraError naming the fix.
    embedding_type: token embedding (and untied output matrix) as "q8_0" (default, as SmolLM2 ships),
        "f16" or "f32".
    name: general.name metadata (default: from the model's config).
    base_model, adapter: provenance, as the user named them (CLI: --model, --adapter). Written as
        general.base_model.count = 1, general.base_model.0.name and a general.description naming the
        adapter merged. When the tokenizer metadata comes from a GGUF of this same model (the shipped
        SmolLM2 file, or `tokenizer_gguf`) with the same shapes, its general.* provenance (license,
        basename, organization, size_label, finetune, tags, languages, ...) is carried over too; see
        `provenance_fields`. Without base_model, the source file's general.name names the base model.
        general.quantized_by is always "qbara".
    """
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType
    from gguf.constants import GGML_QUANT_VERSION

    start = time.perf_counter()
    path = _check_path(path)
    check_llama(model)
    if embedding_type not in EMBEDDING_TYPES:
        raise QbaraError(f"unknown embedding_type {embedding_type!r}: choose one of {', '.join(EMBEDDING_TYPES)}")
    if not isinstance(lossy, bool):
        raise QbaraError(f"lossy must be True or False, got {lossy!r}")
    config = model.config
    n_head, n_kv = int(config.num_attention_heads), int(config.num_key_value_heads)
    head_dim = _head_dim(config)
    layers = model.model.layers

    # 1. Resolve every linear first: refuse before writing anything.
    resolved: list[list[_Linear]] = []
    adapters_merged = 0
    for i, layer in enumerate(layers):
        row = []
        for sub, _ in LINEARS:
            hf_name = f"model.layers.{i}.{sub}"
            item, merged = _resolve_linear(hf_name, layer.get_submodule(sub), lossy)
            adapters_merged += merged
            row.append(item)
        resolved.append(row)
    needs_requant = [item for row in resolved for item in row if item.qtensor is None]
    if needs_requant and not lossy:
        kinds = sorted({item.what for item in needs_requant})
        names = ", ".join(item.name for item in needs_requant[:3])
        more = f" and {len(needs_requant) - 3} more" if len(needs_requant) > 3 else ""
        raise QbaraError(f"{len(needs_requant)} linear layers are not INT4 with block size 32 "
                         f"({', '.join(kinds)}: {names}{more}), so they cannot be written as GGUF Q4_1 "
                         f"losslessly. To export, {FIX_HINT}")

    # 2. Tensors, in llama.cpp names.
    tensors: list[tuple[str, np.ndarray, object]] = []
    exact, requantized = [], []
    err_num = err_den = 0.0
    max_layer_error = 0.0

    embed = model.get_input_embeddings().weight
    arr, raw, emb_err = _float_tensor("token_embd.weight", embed, embedding_type)
    tensors.append(("token_embd.weight", arr, raw))
    for i, (layer, row) in enumerate(zip(layers, resolved)):
        prefix = f"blk.{i}"
        norms = {gguf_name: layer.get_submodule(sub).weight for sub, gguf_name in NORMS}
        tensors.append((f"{prefix}.attn_norm.weight", norms["attn_norm"].detach().float().cpu().numpy(), None))
        for (_, gguf_name), item in zip(LINEARS, row):
            if gguf_name == "ffn_gate":
                tensors.append((f"{prefix}.ffn_norm.weight", norms["ffn_norm"].detach().float().cpu().numpy(),
                                None))
            if item.qtensor is None:  # lossy: re-quantize with qbara's INT4 G32 quantizer
                item.qtensor = quantize(item.dense, Q4_1_CONFIG, name=item.name)
                diff = float((item.dense - item.qtensor.dequantize(torch.float32)).norm()) ** 2
                ref = float(item.dense.norm()) ** 2
                err_num, err_den = err_num + diff, err_den + ref
                max_layer_error = max(max_layer_error, (diff / ref) ** 0.5 if ref > 0 else 0.0)
                requantized.append(item.name)
                item.dense = None
            else:
                exact.append(item.name)
            heads = n_head if gguf_name == "attn_q" else n_kv if gguf_name == "attn_k" else None
            tensors.append((f"{prefix}.{gguf_name}.weight", _q4_1_bytes(item, heads), GGMLQuantizationType.Q4_1))
    tensors.append(("output_norm.weight", model.model.norm.weight.detach().float().cpu().numpy(), None))
    output = model.get_output_embeddings()
    tied = output is None or output.weight is embed or output.weight.data_ptr() == embed.data_ptr()
    if not tied:
        if getattr(output, "bias", None) is not None:
            raise QbaraError("the output layer (lm_head) has a bias, which llama.cpp's llama does not read")
        arr, raw, out_err = _float_tensor("output.weight", output.weight, embedding_type)
        tensors.append(("output.weight", arr, raw))
        emb_err = max(emb_err, out_err)

    source = _source_gguf(tokenizer, tokenizer_gguf)
    tok_fields = _tokenizer_fields(tokenizer, int(embed.shape[0]), source)
    general = provenance_fields(source, base_model, adapter, config=config, vocab_size=int(embed.shape[0]))

    # 3. Write.
    def write(tmp: str) -> None:
        writer = GGUFWriter(tmp, ARCH)
        writer.add_type("model")
        writer.add_name(_model_name(model, name, base_model))
        for key, (value, vtype, sub_type) in general.items():
            writer.add_key_value(key, value, vtype, sub_type=sub_type)
        writer.add_uint32(f"{ARCH}.context_length", int(config.max_position_embeddings))
        writer.add_uint32(f"{ARCH}.embedding_length", int(config.hidden_size))
        writer.add_uint32(f"{ARCH}.block_count", len(layers))
        writer.add_uint32(f"{ARCH}.feed_forward_length", int(config.intermediate_size))
        writer.add_uint32(f"{ARCH}.attention.head_count", n_head)
        writer.add_uint32(f"{ARCH}.attention.head_count_kv", n_kv)
        if head_dim != config.hidden_size // n_head:
            writer.add_uint32(f"{ARCH}.attention.key_length", head_dim)
            writer.add_uint32(f"{ARCH}.attention.value_length", head_dim)
        writer.add_float32(f"{ARCH}.rope.freq_base", _rope_theta(config))
        writer.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", float(config.rms_norm_eps))
        writer.add_uint32("general.file_type", int(LlamaFileType.MOSTLY_Q4_1))
        writer.add_uint32(f"{ARCH}.vocab_size", int(embed.shape[0]))
        writer.add_uint32(f"{ARCH}.rope.dimension_count", head_dim)
        tok_fields.write(writer)
        writer.add_uint32("general.quantization_version", int(GGML_QUANT_VERSION))
        writer.add_string("general.quantized_by", GGUF_MARK)  # how qbara.outputs knows its own files
        for tensor_name, data, raw_dtype in tensors:
            writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_file_atomic(path, write)

    def type_name(data, raw):
        return raw.name if raw is not None else ("F16" if data.dtype == np.float16 else "F32")

    return ExportReport(
        path=path,
        size_bytes=path.stat().st_size,
        tensor_types={n: type_name(d, r) for n, d, r in tensors},
        exact_q4_1=exact,
        requantized=requantized,
        requantize_error=(err_num / err_den) ** 0.5 if err_den > 0 else 0.0,
        max_layer_error=max_layer_error,
        embedding_type=embedding_type,
        embedding_error=emb_err,
        adapters_merged=int(adapters_merged),
        tokenizer_source=tok_fields.source,
        provenance={k: v[0] for k, v in general.items()},
        seconds=time.perf_counter() - start,
    )
