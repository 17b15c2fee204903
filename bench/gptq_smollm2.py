"""GPTQ-LoRA's base against round-to-nearest on SmolLM2-135M, next to the LQ-LoRA / QLoRA / LoftQ numbers.

For each INT format (1 x G groups, fp16 scale and minimum) the model is quantized two ways, round-to-nearest
(`qbara.quantize_model`) and GPTQ ("GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv 2210.17323; `qbara.models.gptq`), and its Hamlet perplexity measured as
bench/lq_smollm2.py does (GPTQ-style windows of 512, the first 8192 tokens). GPTQ-LoRA ("LQ-LoRA",
arXiv 2311.12023, its baseline) starts LoRA at B = 0 on the GPTQ base, so its step-0 model *is* that base.
The LQ-LoRA, LoftQ and QLoRA rows are read from an earlier run of bench/lq_smollm2.py (--lq), not rerun;
their bits/param count the quantized part only, as the LQ-LoRA paper does (LQ-LoRA and LoftQ also carry
rank-64 factors).

The bundled SmolLM2 ships as GGUF Q4_1, i.e. on an INT4-G32 grid: INT4-G32 round-to-nearest reproduces it
almost exactly, so the INT3 and INT2 rows are the informative ones.

    OMP_NUM_THREADS=1 nice -n 15 python bench/gptq_smollm2.py --out bench/results/gptq
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

DEFAULT_FORMATS = "int3:64,int2:32,int4:32,int3:32"
LQ_RESULTS = Path(__file__).parent / "results" / "lq-stored-scale" / "lq_quality.json"


def options(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--formats", default=DEFAULT_FORMATS, help="comma-separated INT formats FORMAT:GROUP")
    ap.add_argument("--samples", type=int, default=32, help="GPTQ calibration sequences (other plays than Hamlet)")
    ap.add_argument("--length", type=int, default=256, help="tokens per calibration sequence")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--no-rtn", action="store_true", help="GPTQ rows only (e.g. for a calibration ablation)")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--dense", action="store_true", help="measure the dense perplexity too (else read from --lq)")
    ap.add_argument("--lq", default=str(LQ_RESULTS), help="lq_quality.json of bench/lq_smollm2.py --ppl")
    ap.add_argument("--out", help="folder for gptq_quality.json / .md / .png")
    return ap.parse_args(argv)


def _timed(fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def measure(model, dense, ids, args) -> dict:
    """bits/param (from the packed buffers), relative weight error and Hamlet perplexity of a quantized model."""
    from qbara.commands.quantize import weight_error
    from qbara.eval import perplexity

    bits, rel = weight_error(dense, model)
    result, wall, cpu = _timed(perplexity, model, ids, window=args.window, max_tokens=args.ppl_tokens,
                               progress=False)
    return {"bits_per_param": bits, "weight_rel_error": rel, "ppl": result.ppl, "ppl_tokens": result.tokens,
            "ppl_s": wall, "ppl_cpu_s": cpu}


def run(args) -> dict:
    from qbara.commands.quantize import parse_format
    from qbara.data import shakespeare_text
    from qbara.eval import perplexity
    from qbara.models import load_model
    from qbara.models.gptq import gptq_calibration, gptq_quantize_model
    from qbara.models.streaming import quantize_model

    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    ids = torch.tensor(tokenizer(shakespeare_text("hamlet"), add_special_tokens=False)["input_ids"])
    calibration = gptq_calibration(tokenizer, args.samples, args.length, exclude=("hamlet",))
    result = {"model": args.model, "window": args.window, "calibration": list(calibration.shape),
              "act_order": args.act_order, "threads": torch.get_num_threads(), "rows": []}
    result["lq_rows"], lq_meta = read_lq(args.lq, args.model)
    result.update({k: v for k, v in lq_meta.items() if k not in result})
    if args.dense:
        dense = perplexity(model, ids, window=args.window, max_tokens=args.ppl_tokens, progress=False)
        result.update(dense_ppl=dense.ppl, ppl_tokens=dense.tokens)
        print(f"dense fp32 perplexity {dense.ppl:.3f} ({dense.tokens} tokens)", flush=True)
    for spec in args.formats.split(","):
        config = parse_format(spec.strip())
        if not args.no_rtn:
            quantized, wall, cpu = _timed(quantize_model, copy.deepcopy(model), config)
            _add_row(result, {"method": f"RTN {config.label}", "kind": "rtn", "format": config.label,
                              "quantize_s": wall, "quantize_cpu_s": cpu, **measure(quantized, model, ids, args)})
            del quantized
        quantized, wall, cpu = _timed(gptq_quantize_model, copy.deepcopy(model), config, calibration,
                                      batch_size=args.batch_size, act_order=args.act_order, progress=False)
        report = quantized.qbara.gptq
        _add_row(result, {"method": f"GPTQ {config.label}", "kind": "gptq", "format": config.label,
                          "quantize_s": wall, "quantize_cpu_s": cpu, "output_error_vs_rtn": report.error_ratio,
                          **measure(quantized, model, ids, args)})
        del quantized
        result["wall_s"] = time.perf_counter() - started
        if args.out:  # after every format, so a stopped run keeps what it measured
            write(result, Path(args.out))
    return result


def _add_row(result: dict, row: dict) -> None:
    result["rows"].append(row)
    extra = f"  output error {row['output_error_vs_rtn']:.3f}x RTN's" if "output_error_vs_rtn" in row else ""
    print(f"  {row['method']:18s} {row['bits_per_param']:6.3f} bits  ppl {row['ppl']:9.3f}  quantize "
          f"{row['quantize_s']:6.1f} s wall / {row['quantize_cpu_s']:6.1f} s CPU{extra}", flush=True)


def read_lq(path, model: str) -> tuple[list[dict], dict]:
    """Rows (method, bits/param, perplexity) of a bench/lq_smollm2.py --ppl result of `model`, and its dense
    perplexity, window and token count (nothing for a result of another model)."""
    path = Path(path)
    if not path.is_file():
        return [], {}
    data = json.loads(path.read_text())
    if data.get("model") != model:
        return [], {}
    rows = [{"method": r["method"], "kind": r["kind"], "fisher": r.get("fisher", False),
             "bits_per_param": r["bits_per_param"], "ppl": r["ppl"], "source": str(path)}
            for r in data.get("rows", []) if "ppl" in r]
    meta = {k: data[k] for k in ("dense_ppl", "ppl_tokens") if k in data}
    if data.get("window") is not None:
        meta["lq_window"] = data["window"]
    return rows, meta


def markdown(result: dict) -> str:
    """The rows (ours and the LQ run's) sorted by bits/param, as a Markdown table."""
    lines = ["| method | bits/param | Hamlet ppl | weight rel. error | output error vs RTN | quantize s (wall / CPU) |",
             "|---|---|---|---|---|---|"]
    rows = [(r, "") for r in result["rows"]] + [(r, " †") for r in result.get("lq_rows", [])]
    for r, mark in sorted(rows, key=lambda item: (-item[0]["bits_per_param"], item[0]["method"])):
        rel = f"{r['weight_rel_error']:.4f}" if "weight_rel_error" in r else "–"
        ratio = f"{r['output_error_vs_rtn']:.3f}" if "output_error_vs_rtn" in r else "–"
        secs = f"{r['quantize_s']:.0f} / {r['quantize_cpu_s']:.0f}" if "quantize_s" in r else "–"
        lines.append(f"| {r['method']}{mark} | {r['bits_per_param']:.3f} | {r['ppl']:.2f} | {rel} | {ratio} | {secs} |")
    if "dense_ppl" in result:
        lines.append(f"| fp32 (dense) | 32 | {result['dense_ppl']:.2f} | 0 | – | – |")
    lines.append("")
    lines.append("† from bench/results/lq-stored-scale (bench/lq_smollm2.py --ppl, step 0, bits of Q only), not rerun.")
    return "\n".join(lines)


def plot(result: dict, path) -> Path:
    """Hamlet perplexity against bits/param: RTN and GPTQ INT rows, and the LQ run's families."""
    from qbara.plotting import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    lq = result.get("lq_rows", [])
    families = [("RTN INT (round to nearest)", [r for r in result["rows"] if r["kind"] == "rtn"], "s", "tab:gray"),
                ("GPTQ INT (GPTQ-LoRA base)", [r for r in result["rows"] if r["kind"] == "gptq"], "v", "tab:red"),
                ("QLoRA NF (RTN) †", [r for r in lq if r["kind"] == "plain"], "x", "k"),
                ("LoftQ NF r64 †", [r for r in lq if r["kind"] == "loftq"], "^", "tab:orange"),
                ("LQ-LoRA r64 †", [r for r in lq if r["kind"] == "lq" and not r["fisher"]], "o", "tab:blue")]
    for label, rows, marker, color in families:
        if rows:
            pts = sorted((r["bits_per_param"], r["ppl"]) for r in rows)
            ax.plot(*zip(*pts), marker=marker, color=color, label=label, ls="-" if "LQ" in label else "none")
    if "dense_ppl" in result:
        ax.axhline(result["dense_ppl"], color="k", ls="--", lw=1, label="fp32")
    ax.set_xlabel("bits / parameter (quantized weights; scale and minimum included)")
    ax.set_ylabel("Hamlet perplexity (step 0)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    calib = result["calibration"]
    ax.set_title(f"{result['model']}: GPTQ vs round-to-nearest ({calib[0]} x {calib[1]} calibration tokens)",
                 fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def write(result: dict, out: Path) -> None:
    from qbara.atomic import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "gptq_quality.json", result)
    (out / "gptq_quality.md").write_text(markdown(result) + "\n")
    plot(result, out / "gptq_quality.png")


def main(argv=None) -> None:
    result = run(options(argv))
    print()
    print(markdown(result))
    print(f"\ntotal {result['wall_s']:.0f} s wall")


if __name__ == "__main__":
    main()
