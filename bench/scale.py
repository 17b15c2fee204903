"""Memory and time at real model sizes: qbara quantize-on-load vs load-then-quantize vs transformers+bitsandbytes.

Random LLaMA models (bf16 safetensors, made once into --cache) of ~0.1B, ~0.5B and 1.1B parameters (TinyLlama's
shape: hidden 2048, FFN 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000). Each case runs in a fresh
subprocess, so every peak is its own:
  qbara-eager   load_model(folder) (fp32 copy of the model) + prepare(NF4, LoRA r16)   -- qbara <= 0.1
  qbara-nf4     load_model(folder, quant=NF4) + prepare(LoRA r16)                        -- quantize on load
  qbara-int4    load_model(folder, quant=INT4-G32) + prepare(QA-HiRA)
  bnb-nf4       from_pretrained(BitsAndBytesConfig nf4, fp32 compute) + PEFT LoRA r16
and, on request (--cases), LQ-LoRA init (budget 3.0, rank 64, QLoRA's nf2/3/4/8 candidates, 2 table and 3
decomposition iterations: the memory is the point, not the quality):
  qbara-lq-dense  load_model(folder) (fp32) + lq_prepare(model)                          -- qbara <= 0.1
  qbara-lq-stream lq_prepare(folder): table, decompositions and load streamed from the shards
Measured per case: load+prepare wall time; peak RSS (VmHWM, includes the memory-mapped checkpoint pages) and
peak anonymous memory (RssAnon sampled every 10 ms: the process's own allocations); then --steps training
steps (batch 1 x 256 tokens, AdamW on the adapters, fp32 compute), median time of the steps after the first.
Prints the ratios qbara/bnb and writes scale.json, scale.png and the extrapolation to 7B/13B/70B.

    python bench/scale.py --out bench/results/scale            # all sizes (about 15 min on 2 CPU cores)
    python bench/scale.py --sizes 0.1b --steps 2 --out /tmp/s  # quick look
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from measure import PeakAnon, proc_status_bytes, timed_training_steps

SIZES = {  # hidden, ffn, layers, heads, kv heads, vocab
    "0.1b": (768, 2048, 12, 12, 4, 32000),
    "0.5b": (1536, 4096, 16, 12, 4, 32000),
    "1.1b": (2048, 5632, 22, 32, 4, 32000),
}
CASES = ("qbara-eager", "qbara-nf4", "qbara-int4", "bnb-nf4")
LQ_CASES = ("qbara-lq-dense", "qbara-lq-stream")
GiB = 1024 ** 3


def parameter_count(size: str) -> int:
    h, f, n, heads, kv, v = SIZES[size]
    head_dim = h // heads
    attention = 2 * h * h + 2 * h * kv * head_dim
    return n * (attention + 3 * h * f + 2 * h) + 2 * v * h + h


def make_model(size: str, cache: Path) -> Path:
    """A random bf16 LLaMA of `size` saved as safetensors in cache/size (made once)."""
    folder = cache / size
    if (folder / "done").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    h, f, n, heads, kv, v = SIZES[size]
    config = LlamaConfig(hidden_size=h, intermediate_size=f, num_hidden_layers=n, num_attention_heads=heads,
                         num_key_value_heads=kv, vocab_size=v, max_position_embeddings=2048, tie_word_embeddings=False)
    from qbara.models.tiny import tiny_llama

    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="1GB")
    tiny_llama()[1].save_pretrained(folder)  # a small byte-level tokenizer: the benchmark feeds random ids
    (folder / "done").write_text("1")
    return folder


# ---------------------------------------------------------------- one case, in its own process

def run_case(case: str, folder: str, steps: int) -> dict:
    import torch
    import transformers  # noqa: F401  (imported before the baseline: the peak is the load's own)

    if case.startswith("qbara"):
        import qbara  # noqa: F401
    else:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    torch.manual_seed(0)
    baseline = PeakAnon.now()
    start = time.perf_counter()
    with PeakAnon() as load_peak:
        model = _load(case, folder)
    load_s = time.perf_counter() - start
    result = {"case": case, "load_s": load_s, "load_peak_anon": load_peak.peak, "baseline_anon": baseline,
              "load_peak_rss": proc_status_bytes("VmHWM")}
    if steps:
        if case == "bnb-nf4":  # fp32 compute like qbara's: what prepare_model_for_kbit_training does
            for p in model.parameters():
                if p.dtype == torch.bfloat16:
                    p.data = p.data.float()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        ids = torch.randint(0, 32000, (1, 256), generator=torch.Generator().manual_seed(0))
        with PeakAnon() as train_peak:
            times, _ = timed_training_steps(model, ids, optimizer, steps)
        result.update(step_s=statistics.median(times[1:] or times), steps=times, train_peak_anon=train_peak.peak,
                      trainable=sum(p.numel() for p in params))
    result["peak_rss"] = proc_status_bytes("VmHWM")
    return result


def _load(case: str, folder: str):
    import torch

    if case.startswith("qbara-lq"):
        return _load_lq(case, folder)
    if case.startswith("qbara"):
        from qbara import AdapterConfig, QuantConfig, load_model, prepare

        quant = QuantConfig("int4", 32) if case == "qbara-int4" else QuantConfig("nf4")
        adapter = AdapterConfig("qahira", rank=16, alpha=32) if case == "qbara-int4" else \
            AdapterConfig("lora", rank=16, alpha=32)
        if case == "qbara-eager":
            model, _ = load_model(folder)
        else:
            model, _ = load_model(folder, quant=quant)
        return prepare(model, quant, adapter)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    # The checkpoint's dtype (bf16) for what bitsandbytes leaves unquantized, as transformers loads by default.
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.bfloat16)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))


def _load_lq(case: str, folder: str):
    import tempfile

    from qbara import load_model, lq_prepare
    from qbara.lq.configs import qlora_config

    os.environ["QBARA_CACHE"] = tempfile.mkdtemp()  # no cached error table: each case computes its own
    options = dict(configs=[qlora_config(b) for b in (2, 3, 4, 8)], table_iters=2, max_iters=3, progress=False)
    source = load_model(folder)[0] if case == "qbara-lq-dense" else folder
    return lq_prepare(source, 3.0, 64, **options)


# ---------------------------------------------------------------- driver

def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.1b,0.5b,1.1b")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--steps", type=int, default=3, help="training steps per case (0: load only)")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/qbara/scale-models"))
    parser.add_argument("--out", default="bench/results/scale")
    parser.add_argument("--case-json", help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    args = parser.parse_args(argv)
    if args.case_json:
        case, folder = args.case_json.split("|", 1)
        print("RESULT " + json.dumps(run_case(case, folder, args.steps)))
        return {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for size in args.sizes.split(","):
        folder = make_model(size, Path(args.cache))
        results[size] = {"params": parameter_count(size), "cases": {}}
        for case in args.cases.split(","):
            proc = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--case-json",
                                   f"{case}|{folder}"], capture_output=True, text=True,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                results[size]["cases"][case] = {"error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
                print(f"{size} {case}: FAILED {results[size]['cases'][case]['error']}", flush=True)
                continue
            r = json.loads(lines[-1][len("RESULT "):])
            results[size]["cases"][case] = r
            print(f"{size} {case:12s} load {r['load_s']:6.1f} s  peak anon {r['load_peak_anon'] / GiB:6.2f} GiB  "
                  f"peak RSS {r['load_peak_rss'] / GiB:6.2f} GiB" +
                  (f"  step {r['step_s']:6.2f} s" if "step_s" in r else ""), flush=True)
        (out / "scale.json").write_text(json.dumps(results, indent=2))
    report = summarize(results)
    (out / "scale.md").write_text(report)
    print(report)
    plot(results, out / "scale.png")
    return results


def _ratio(a, b, key):
    return a[key] / b[key] if key in a and key in b and b[key] else float("nan")


def summarize(results: dict) -> str:
    lines = ["| model | case | load+prepare s | peak anon GiB (B/param) | peak RSS GiB | step s | "
             "vs bnb-nf4 (LQ: vs qbara-lq-dense): anon / RSS / load / step |",
             "|---|---|---|---|---|---|---|"]
    per_param = {}
    for size, entry in results.items():
        n = entry["params"]
        bnb = entry["cases"].get("bnb-nf4", {})
        for case, r in entry["cases"].items():
            if "error" in r:
                lines.append(f"| {size} | {case} | failed: {r['error']} | | | | |")
                continue
            anon = r["load_peak_anon"] - r["baseline_anon"]
            per_param.setdefault(case, []).append(anon / n)
            step = f"{r['step_s']:.2f}" if "step_s" in r else "-"
            ref = entry["cases"].get("qbara-lq-dense", {}) if case.startswith("qbara-lq") else bnb
            vs = "-" if case in ("bnb-nf4", "qbara-lq-dense") or not ref or "error" in ref else (
                f"{_ratio(r, ref, 'load_peak_anon'):.2f}× / {_ratio(r, ref, 'load_peak_rss'):.2f}× / "
                f"{_ratio(r, ref, 'load_s'):.2f}× / {_ratio(r, ref, 'step_s'):.2f}×")
            lines.append(f"| {size} ({n / 1e9:.2f}B) | {case} | {r['load_s']:.1f} | "
                         f"{anon / GiB:.2f} ({anon / n:.2f}) | "
                         f"{r['load_peak_rss'] / GiB:.2f} | {step} | {vs} |")
    lines += ["", "Peak anonymous memory of loading, above the process's own baseline (Python, torch, transformers),",
              "in bytes per parameter, extrapolated (largest measured size's B/param × parameters + baseline):", "",
              "| case | B/param | 7B | 13B | 70B |", "|---|---|---|---|---|"]
    for case, values in per_param.items():
        b = values[-1]
        lines.append(f"| {case} | {b:.2f} | {7e9 * b / GiB:.1f} GiB | {13e9 * b / GiB:.1f} GiB | "
                     f"{70e9 * b / GiB:.1f} GiB |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    from qbara.plotting import pyplot, save_figure

    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4))
    for case in CASES + LQ_CASES:
        xs, anon, load = [], [], []
        for size, entry in results.items():
            r = entry["cases"].get(case)
            if r and "error" not in r:
                xs.append(entry["params"] / 1e9)
                anon.append((r["load_peak_anon"] - r["baseline_anon"]) / GiB)
                load.append(r["load_s"])
        if xs:
            axes[0].plot(xs, anon, "o-", label=case)
            axes[1].plot(xs, load, "o-", label=case)
    axes[0].set(xlabel="parameters (B)", ylabel="peak anonymous memory of loading (GiB)")
    axes[1].set(xlabel="parameters (B)", ylabel="load + prepare (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
