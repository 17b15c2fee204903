"""`qbara quantize`: quantize a model in several formats; report bits/param, weight error, size and perplexity.
With --gptq each INT format is also quantized by GPTQ (`qbara.models.gptq`); --save writes that model. With
--imatrix each gguf:* format is also quantized with its rounding weighted by an importance matrix (llama.cpp's
imatrix path, `qbara.lq.importance_matrix`), from the same calibration text as GPTQ's."""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass

import torch

from qbara.data.corpora import shakespeare_text
from qbara.data.special_tokens import leading_bos
from qbara.errors import QbaraError
from qbara.eval.harness import count_type
from qbara.eval.perplexity import perplexity
from qbara.lq.imatrix import importance_matrix
from qbara.models import load_model
from qbara.models.gptq import DEFAULT_LENGTH, DEFAULT_SAMPLES, gptq_calibration, gptq_quantize_model
from qbara.models.loader import load_model_tokenizer
from qbara.models.streaming import quantize_model
from qbara.native import save_quantized
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.outputs import check_output
from qbara.quant.config import QuantConfig
from qbara.quant.formats import FAMILIES

__all__ = ["add_parser", "model_bytes", "parse_format", "weight_error"]


@dataclass
class _QuantizationReport:
    label: str
    bits_per_param: float
    weight_rel_error: float
    model_bytes: int
    model_ratio_vs_fp32: float
    ppl: float
    tokens: int
    window: int


def parse_format(spec: str) -> QuantConfig:
    """'nf4' | 'nf4:64' | 'int4:32' | 'int4:4x8' (group 4, 8 rows) | 'gguf:q4_k' (a GGML block format, fixed block)
    -> QuantConfig (default blocks: NF 64, INT 32)."""
    if any(spec.lower().startswith(family.prefix) for family in FAMILIES.values() if family.fixed_block):
        return QuantConfig(spec.lower())
    name, _, block = spec.partition(":")
    if not block:
        return QuantConfig(name)
    size, _, rows = block.partition("x")
    try:
        size, rows = int(size), int(rows or 1)
    except ValueError:
        raise QbaraError(f"bad format {spec!r}: write FORMAT[:BLOCK[xROWS]], e.g. nf4, nf3:64, int4:32") from None
    return QuantConfig(name, block_size=size, block_rows=rows) if rows > 1 else QuantConfig(name, block_size=size)


def model_bytes(model: torch.nn.Module) -> int:
    """Resident bytes of all parameters and buffers (tied tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def weight_error(dense: torch.nn.Module, quantized: torch.nn.Module) -> tuple[float, float]:
    """(bits/param measured from the packed buffers, relative Frobenius error) over the quantized linears."""
    err2 = ref2 = 0.0
    bits = numel = 0
    for name, module in quantized.named_modules():
        if isinstance(module, QuantizedLinear):
            w = dense.get_submodule(name).weight.float()
            err2 += float((module.dequantize() - w).pow(2).sum())
            ref2 += float(w.pow(2).sum())
            bits += module.nbytes * 8
            numel += w.numel()
    return bits / numel, (err2 / ref2) ** 0.5


def _command(args) -> list[_QuantizationReport]:
    configs = [parse_format(s.strip()) for s in args.formats.split(",") if s.strip()]
    gptq_configs = _gptq_configs(args, configs)
    imatrix_configs = _imatrix_configs(args, configs)
    # Everything but the model first: the play and the calibration (with the model's tokenizer files).
    text = shakespeare_text(args.play)
    calibration = (_calibration(args, load_model_tokenizer(args.model)) if gptq_configs or imatrix_configs
                   else None)
    model, tokenizer = load_model(args.model)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    importance = importance_matrix(model, calibration, progress=not args.json) if imatrix_configs else None
    fp32_bytes = model_bytes(model)
    bos = leading_bos(tokenizer)
    base = perplexity(model, ids, window=args.window, max_tokens=args.eval_tokens, progress=not args.json, bos=bos)
    rows = [_QuantizationReport("fp32", 32.0, 0.0, fp32_bytes, 1.0, base.ppl, base.tokens, base.window)]
    for config in configs:
        methods = [("", quantize_model)] + ([("gptq ", _gptq_quantizer(args, calibration))]
                                            if config in gptq_configs else [])
        if config in imatrix_configs:
            methods.append(("imatrix ", _imatrix_quantizer(importance)))
        for prefix, method in methods:
            quantized = method(copy.deepcopy(model), config, progress=not args.json)
            bits, rel = weight_error(model, quantized)
            size = model_bytes(quantized)
            result = perplexity(quantized, ids, window=args.window, max_tokens=args.eval_tokens,
                                progress=not args.json, bos=bos)
            rows.append(_QuantizationReport(prefix + config.label, bits, rel, size, size / fp32_bytes, result.ppl,
                                           result.tokens, result.window))
            if prefix == "gptq " and args.save:
                save_quantized(quantized, tokenizer, args.save, overwrite=args.overwrite)
            del quantized
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(f"\nmodel {args.model}; perplexity on Shakespeare ({args.play}), {rows[0].tokens} tokens, "
              f"window {rows[0].window}; linear layers quantized, embeddings and norms kept fp32")
        if imatrix_configs:
            print(f"imatrix rows: every block's scale search weighted by the mean square activation of its input "
                  f"columns over {calibration.shape[0]} x {calibration.shape[1]} calibration tokens of other "
                  f"Shakespeare plays (llama-quantize's importance-matrix path, bit for bit)")
        if gptq_configs:
            print(f"gptq rows: GPTQ (Frantar et al. 2022) on {calibration.shape[0]} x {calibration.shape[1]} "
                  f"calibration tokens of other Shakespeare plays; the other rows round to nearest. GPTQ minimises "
                  f"the layers' output error, so its weight error (rel. error) is higher")
        print(f"{'format':<24}{'bits/param':>11}{'rel. error':>12}{'model MB':>10}{'vs fp32':>9}{'ppl':>9}")
        for r in rows:
            print(f"{r.label:<24}{r.bits_per_param:>11.3f}{r.weight_rel_error:>12.4f}{r.model_bytes / 1e6:>10.1f}"
                  f"{r.model_ratio_vs_fp32:>9.3f}{r.ppl:>9.3f}")
        if args.save:
            print(f"GPTQ model written to {args.save}; attach LoRA with qbara train --model.name {args.save} "
                  f"(and the same quant)")
    return rows


def _gptq_configs(args, configs: list[QuantConfig]) -> list[QuantConfig]:
    """The formats GPTQ quantizes (the INT ones with 1 x G groups) when --gptq is given; options checked."""
    if not args.gptq:
        if args.save:
            raise QbaraError("--save and the calibration options go with --gptq (--save writes the GPTQ model); "
                             "add --gptq")
        if not args.imatrix and (args.calibration_samples is not None or args.calibration_length is not None):
            raise QbaraError("--calibration-samples and --calibration-length go with --gptq or --imatrix; add one")
        return []
    chosen = [c for c in configs if c.family.takes_gptq and c.block_rows == 1]
    if not chosen:
        raise QbaraError(f"--gptq quantizes INT formats with 1 x G groups, and --formats {args.formats!r} has none; "
                         f"add one, e.g. --formats int3:64,int4:32")
    if args.save and len(chosen) != 1:
        raise QbaraError(f"--save writes one GPTQ model, but --formats has {len(chosen)} INT formats; name one, "
                         f"e.g. --formats int3:64")
    if args.save:
        check_output(args.save, [args.model], overwrite=args.overwrite, option="--save")
    return chosen


def _imatrix_configs(args, configs: list[QuantConfig]) -> list[QuantConfig]:
    """The formats quantized again under an importance matrix (the gguf:* ones) when --imatrix is given."""
    if not args.imatrix:
        return []
    chosen = [c for c in configs if c.family.takes_importance]
    if not chosen:
        raise QbaraError(f"--imatrix weights the rounding of gguf:* formats, and --formats {args.formats!r} has none; "
                         f"add one, e.g. --formats gguf:q4_0,gguf:q4_k")
    return chosen


def _imatrix_quantizer(importance):
    def quantize(model, config, progress):
        return quantize_model(model, config, progress=progress, importance=importance)
    return quantize


def _calibration(args, tokenizer):
    samples = DEFAULT_SAMPLES if args.calibration_samples is None else args.calibration_samples
    length = DEFAULT_LENGTH if args.calibration_length is None else args.calibration_length
    return gptq_calibration(tokenizer, samples, length, exclude=(args.play,))


def _gptq_quantizer(args, calibration):
    def quantize(model, config, progress):
        return gptq_quantize_model(model, config, calibration, progress=progress)
    return quantize


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="quantize a model in several formats and compare them")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), tiny-llama, or a local folder")
    p.add_argument("--formats", default="nf4,nf3,int4:32,int3:32",
                   help="comma-separated FORMAT[:BLOCK[xROWS]] (default: nf4,nf3,int4:32,int3:32)")
    p.add_argument("--play", default="hamlet", help="Shakespeare play for the perplexity text")
    p.add_argument("--window", type=int, default=512, help="perplexity window in tokens")
    p.add_argument("--eval-tokens", type=int, default=8192, help="tokens evaluated (0 = whole text)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    g = p.add_argument_group("GPTQ (Frantar et al. 2022; the GPTQ-LoRA baseline of LQ-LoRA)")
    g.add_argument("--gptq", action="store_true",
                   help="also quantize each INT format (1 x G groups) with GPTQ: one more row per format, "
                        "calibrated on Shakespeare plays other than --play")
    g.add_argument("--calibration-samples", type=count_type(1), default=None,
                   help="GPTQ / --imatrix calibration sequences (default 128, as the GPTQ paper)")
    g.add_argument("--calibration-length", type=count_type(1), default=None,
                   help="tokens per calibration sequence (default 256)")
    g.add_argument("--imatrix", action="store_true",
                   help="also quantize each gguf:* format with its rounding weighted by an importance matrix (the "
                        "mean square activation per input column, what llama-imatrix collects) from the calibration "
                        "plays: one more row per format")
    g.add_argument("--save", metavar="DIR",
                   help="write the GPTQ model (one INT format) as a quantized folder to fine-tune LoRA on: "
                        "qbara train --model.name DIR with the same quant")
    g.add_argument("--overwrite", action="store_true",
                   help="write --save into a non-empty folder qbara did not write (its files are kept)")
    p.set_defaults(func=_command)
