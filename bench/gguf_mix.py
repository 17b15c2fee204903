"""Benchmark: qbara's GGUF mixes against llama.cpp's own quantization mixes at equal file size (SmolLM2-135M).

The anchor comparison of issue #13. Dense weights: the bundled SmolLM2 file dequantized to F32. Rows:
  stock            llama.cpp's mixes (Q2_K, Q3_K_S, Q3_K_M, Q4_0, Q4_K_S, Q4_K_M, Q4_1, Q5_K_M ...) made by
                   llama.cpp's own quantizer (`llama_model_quantize` through llama-cpp-python) from the F32 file;
  stock+imatrix    the same with an importance matrix (per input column, the mean of x² over the calibration
                   tokens, computed here by hooks on every linear, what llama-imatrix collects) handed to
                   llama.cpp through `llama_model_quantize_params.imatrix`;
  qbara-ilp        qbara's ILP over the GGML formats (`qbara.lq.gguf_configs`) under a *file* budget equal to
                   the stock file's tensor bits/param (`FileBudget`: Q8_0 embedding, F32 norms, as llama.cpp's
                   files have them here), plain Frobenius costs, written by `export_gguf`;
  qbara-ilp+fisher the same with Fisher-weighted costs from the calibration tokens;
  qbara+imatrix    the Fisher-cost ILP with every block's scale search weighted by the same importance matrix
                   llama.cpp gets (qbara's quantizers on llama.cpp's imatrix path, bit for bit): the tables'
                   costs and the file use that rounding;
  qbara+fisher-rnd the same with the rounding weighted per weight by the Fisher diagonal;
  qahira           the Fisher ILP with gguf:q4_1 replaced by INT4 G32 (the same Q4_1 blocks in the file, but
                   foldable), a short QA-HiRA fine-tune on the INT4 layers (other plays than Hamlet: domain
                   adaptation, not a like-for-like quantizer comparison), folded into the zero-points, exported.
Perplexity: Hamlet, non-overlapping windows of --window tokens (the first --windows of them), measured by qbara
(fp32 model holding the file's weights) and by llama.cpp itself (the file run as written: llama.cpp quantizes
activations). Calibration text: the plays in --calib-plays (never Hamlet).

Caveat printed with the results: SmolLM2 as shipped is a Q4_1 file, so the "dense" weights lie on the Q4_1 grid;
any file holding Q4_1 for a matrix stores it losslessly. Sizes at or above the stock Q4_1 file are degenerate
(qbara's ILP picks the lossless format there); the informative budgets are those below it. SmolLM2's 576-wide
rows are not a multiple of 256, so llama.cpp falls back from K-quants to Q4_0/Q5_0/Q5_1/Q8_0 on every matrix
but ffn_down: its Q2_K file is ~5.1 bits/param, and the 3.0-4.5 bits/param budgets the issue names cannot be
reached by either side on this model (the Q8_0 embedding alone is 1.8 bits/param of it).

The llama.cpp side runs in another interpreter (--llama-python, default /work/llama-venv/bin/python: numpy +
llama_cpp) as `gguf_mix.py --worker JOB.json`; this file imports only the standard library and numpy at top.
Results are kept per row in OUT/gguf_mix.json (rerunning skips rows already there; --fresh recomputes).

    nice -n 10 python3 bench/gguf_mix.py [--windows 16] [--threads 2] [--out bench/results/gguf_mix]
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from gguf_llamacpp import LLAMA_PYTHON, nll, plain_cpu_buffers

HERE = Path(__file__).resolve()

STOCK = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_0", "Q4_K_S", "Q4_1", "Q4_K_M", "Q5_K_M")
CALIB_PLAYS = ("macbeth", "othello", "lear", "romeo_and_juliet")
BITS_TOL = 1e-6  # budgets are the stock files' bits/param rounded to 6 decimals


# ======================================================================================= llama.cpp side
def worker(job_path: str) -> None:
    """Run JOB.json in llama.cpp: quantize files, then measure perplexities."""
    job = json.loads(Path(job_path).read_text())
    if not job.get("extra_bufts", False):
        plain_cpu_buffers()
    out = {"quantize": [llama_quantize(q, job["threads"]) for q in job.get("quantize", [])],
           "perplexity": [llama_perplexity(p["model"], p.get("lora"), job["windows"], job["threads"])
                          for p in job.get("perplexity", [])]}
    Path(job["result"]).write_text(json.dumps(out))


def llama_quantize(q: dict, threads: int) -> dict:
    """llama.cpp's quantizer: q["src"] (F32 GGUF) -> q["dst"] as ftype q["ftype"], with q["imatrix"] (.npz of
    gguf tensor name -> per-column importance) when given."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + q["ftype"])
    params.nthread = threads
    keep = []
    if q.get("imatrix"):
        data = np.load(q["imatrix"])
        entries = (llama_cpp.llama_model_imatrix_data * (len(data.files) + 1))()  # last one: NULL name ends it
        for entry, name in zip(entries, data.files):
            values = np.ascontiguousarray(data[name], dtype=np.float32)
            keep.append(values)
            entry.name = name.encode()
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = values.size
        params.imatrix = entries
    t = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(q["src"].encode(), q["dst"].encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({q['ftype']}) returned {rc}")
    return {"dst": q["dst"], "seconds": time.perf_counter() - t}


def llama_perplexity(model: str, lora: str | None, windows: list[list[int]], threads: int) -> dict:
    """Mean NLL over every window (position t predicts t+1), each window evaluated from an empty context;
    `lora`: a LoRA adapter GGUF applied at scale 1 (llama-cli's --lora)."""
    from llama_cpp import Llama

    n = len(windows[0])
    t = time.perf_counter()
    llm = Llama(model_path=model, logits_all=True, n_ctx=n, n_batch=n, n_threads=threads,
                n_threads_batch=threads, verbose=False, seed=0, **({"lora_path": lora} if lora else {}))
    total, count, per_window = 0.0, 0, []
    for ids in windows:
        llm.reset()
        llm.eval(ids)
        per_window.append(nll(np.array(llm.scores[:n]), ids))
        total += per_window[-1] * (n - 1)
        count += n - 1
    llm.close()
    seconds = time.perf_counter() - t
    print(f"  llama.cpp {Path(model).name}: ppl {math.exp(total / count):.3f} ({seconds:.0f} s)", flush=True)
    return {"model": model, "nll": total / count, "tokens": count, "seconds": seconds, "window_nlls": per_window}


def run_llama(job: dict, args, work: Path) -> dict:
    job = dict(job, threads=args.llama_threads, extra_bufts=args.extra_bufts, result=str(work / "llama_result.json"))
    path = work / "llama_job.json"
    path.write_text(json.dumps(job))
    subprocess.run(["nice", "-n", "10", args.llama_python, str(HERE), "--worker", str(path)], check=True)
    return json.loads(Path(job["result"]).read_text())


# ======================================================================================= qbara side
def tensor_stats(path: Path) -> dict:
    """Tensor-data bits/param of a GGUF file (metadata left out), the file's own, and its tensor type counts."""
    from collections import Counter

    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    params = sum(int(t.n_elements) for t in reader.tensors)
    data = sum(int(t.n_bytes) for t in reader.tensors)
    return {"bits": 8 * data / params, "file_bits": 8 * path.stat().st_size / params, "params": params,
            "types": dict(Counter(t.tensor_type.name for t in reader.tensors))}


def qbara_nll(model, windows) -> float:
    import torch

    from qbara.eval.perplexity import perplexity

    ids = torch.tensor([i for w in windows for i in w])
    return perplexity(model, ids, window=len(windows[0]), progress=False).nll


def gguf_imatrix(importance: dict) -> dict:
    """qbara's importance matrix (module name -> per-column mean x², `qbara.lq.importance_matrix`) keyed by GGUF
    tensor name (blk.N.attn_q.weight ...), as llama.cpp's quantizer looks it up."""
    from qbara.export.gguf.linears import LINEARS

    names = {}
    for module in importance:
        prefix, _, sub = module.partition(".layers.")
        index, _, rest = sub.partition(".")
        names.update({module: f"blk.{index}.{g}.weight" for s, g in LINEARS if s == rest})
    return {names[m]: v.numpy() for m, v in importance.items() if m in names}


def calibration(tokenizer, args):
    from qbara.data import shakespeare_text
    from qbara.lq.fisher import calibration_sequences

    text = "\n".join(shakespeare_text(p) for p in args.calib_plays)
    return calibration_sequences(tokenizer, text, args.calib, args.window, seed=args.seed)


def ilp_model(dense, table, budget: float, swap_q4_1: bool = False, importance=None):
    """A copy of `dense` quantized as the table's file-budget allocation at `budget` (file bits/param), the gguf:*
    layers rounded under `importance` when given (the one the table was computed with)."""
    import copy

    from qbara.lq.filesize import FileBudget
    from qbara.models.streaming import quantize_model

    allocation = table.allocate(budget, FileBudget.of_model(dense))
    configs = dict(allocation.configs)
    if swap_q4_1:
        from qbara.quant import QuantConfig

        configs = {n: QuantConfig("int4", block_size=32) if c.format == "gguf:q4_1" else c for n, c in configs.items()}
    model = copy.deepcopy(dense)
    return quantize_model(model, configs, importance=importance), allocation


def qahira_finetune(model, tokenizer, args) -> dict:
    """QA-HiRA on the INT4 G32 layers, --ft-steps on the calibration plays, folded into the zero-points."""
    import warnings

    from qbara import AdapterConfig, merge
    from qbara.adapters.attach import attach_adapters
    from qbara.data import shakespeare_text
    from qbara.nn.quantized_linear import QuantizedLinear
    from qbara.train.data import Example

    from finetune_quality import train_steps

    names = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and m.quant_config.kind == "int"]
    if not names:
        return {"adapted": 0}
    for p in model.parameters():
        p.requires_grad_(False)
    attach_adapters(model, AdapterConfig("qahira", rank=args.ft_rank, alpha=2 * args.ft_rank, target_modules=names))
    text = "\n".join(shakespeare_text(p) for p in args.calib_plays)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    seq = args.ft_seq
    train = [Example(ids[i:i + seq], ids[i:i + seq]) for i in range(0, len(ids) - seq + 1, seq)]
    curve, step_s = train_steps(model, train, args.ft_steps, args.ft_batch, args.ft_lr, args.seed, "cpu")
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merge(model, into="quantized")
    return {"adapted": len(names), "train_start": float(np.mean(curve[:5])), "train_end": float(np.mean(curve[-5:])),
            "step_s": step_s}


# ======================================================================================= the run
class Rows:
    """The result rows, keyed "kind:name", saved to OUT/gguf_mix.json after every change."""

    def __init__(self, path: Path, fresh: bool):
        self.path = path
        self.data = {} if fresh or not path.exists() else json.loads(path.read_text())
        self.data.setdefault("rows", {})

    def __contains__(self, key):
        return key in self.data["rows"]

    def __getitem__(self, key):
        return self.data["rows"][key]

    def put(self, key: str, row: dict) -> None:
        self.data["rows"][key] = {**self.data["rows"].get(key, {}), **row}
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        tmp.replace(self.path)


def stock_rows(rows: Rows, dense_f32: Path, imatrix: Path, args, work: Path) -> None:
    """llama.cpp's own mixes, without and with the importance matrix."""
    todo = []
    for ftype in args.stock:
        for kind, imx in (("stock", None), ("stock+imatrix", imatrix)):
            dst = work / f"{kind.replace('+', '-')}-{ftype}.gguf"
            if f"{kind}:{ftype}" not in rows or not dst.exists():
                todo.append({"src": str(dense_f32), "dst": str(dst), "ftype": ftype,
                             "imatrix": str(imx) if imx else None, "kind": kind, "name": ftype})
    if todo:
        print(f"llama.cpp quantizes {len(todo)} files")
        done = run_llama({"quantize": todo, "windows": []}, args, work)["quantize"]
        for q, d in zip(todo, done):
            rows.put(f"{q['kind']}:{q['name']}", {"kind": q["kind"], "name": q["name"], "path": q["dst"],
                                                  "quantize_s": d["seconds"], **tensor_stats(Path(q["dst"]))})


def qbara_stock_nll(rows: Rows, windows) -> None:
    """qbara's perplexity of every stock file: its weights dequantized by gguf-py, run in fp32."""
    from qbara.models.smollm2 import load_gguf_as_hf

    for key, row in rows.data["rows"].items():
        if row["kind"].startswith("stock") and "nll_qbara" not in row and "same_as" not in row:
            model, _ = load_gguf_as_hf(row["path"])
            rows.put(key, {"nll_qbara": qbara_nll(model, windows)})
            print(f"  qbara  {key}: ppl {math.exp(rows[key]['nll_qbara']):.3f}")


def mark_duplicates(rows: Rows) -> None:
    """Rows whose file holds the same tensors as an earlier row's (llama.cpp's Q2_K and Q3_K_S mixes are the same
    file on SmolLM2) are marked `same_as` it and take its measurements instead of repeating them."""
    seen = {}
    for key, row in rows.data["rows"].items():
        if row.get("path") and row["kind"] != "dense" and "same_as" not in row:
            stamp = [Path(p).stat().st_mtime_ns for p in (row["path"], row.get("lora_path")) if p]
            if row.get("digest_of") != stamp:  # hashed once per written file
                rows.put(key, {"digest": tensor_digest(Path(row["path"]), row.get("lora_path")), "digest_of": stamp})
            digest = rows[key]["digest"]
            if digest in seen:
                rows.put(key, {"same_as": seen[digest]})
            else:
                seen[digest] = key


def copy_duplicates(rows: Rows) -> None:
    for key, row in rows.data["rows"].items():
        if "same_as" in row:
            src = rows[row["same_as"]]
            rows.put(key, {k: src[k] for k in ("nll_qbara", "nll_llama") if k in src})


def tensor_digest(path: Path, lora: str | None = None) -> str:
    """sha256 of every tensor's name, type and bytes (the metadata, e.g. general.file_type, left out)."""
    import hashlib

    from gguf import GGUFReader

    h = hashlib.sha256()
    for p in [path] + ([Path(lora)] if lora else []):
        for t in GGUFReader(str(p)).tensors:
            h.update(f"{t.name}:{t.tensor_type.name}".encode())
            h.update(np.ascontiguousarray(t.data).tobytes())
    return h.hexdigest()


def imatrix_bytes_check(rows: Rows, dense_f32: Path, imatrix: Path) -> None:
    """For every llama.cpp file made with the importance matrix: how many of its quantized tensors qbara's
    quantizer writes byte for byte from the same F32 tensor and the same importance (`quantize_ggml(...,
    importance=)`), recorded as "qbara_bytes" [equal, compared] on the row."""
    import torch
    from gguf import GGUFReader

    from qbara.quant.ggml import GGML_FORMATS, quantize_ggml

    importance = np.load(imatrix)
    dense = {t.name: t for t in GGUFReader(str(dense_f32)).tensors}
    for key, row in rows.data["rows"].items():
        if row["kind"] != "stock+imatrix" or "qbara_bytes" in row or "same_as" in row:
            continue
        equal = compared = 0
        for t in GGUFReader(row["path"]).tensors:
            fmt = t.tensor_type.name.lower()
            if fmt not in GGML_FORMATS or t.name not in importance.files:
                continue
            weight = torch.from_numpy(np.array(dense[t.name].data, dtype=np.float32))
            ours = quantize_ggml(weight, fmt, t.name, importance=torch.from_numpy(importance[t.name]))
            equal += int(np.array_equal(ours.numpy().reshape(-1), np.asarray(t.data).reshape(-1).view(np.uint8)))
            compared += 1
        rows.put(key, {"qbara_bytes": [equal, compared]})
        print(f"  {key}: qbara writes {equal} of its {compared} importance-weighted tensors byte for byte")


def llama_nll(rows: Rows, windows, args, work: Path) -> None:
    """llama.cpp's perplexity of every file not measured yet (one worker run; none with --no-llama-ppl)."""
    if not args.llama_ppl:
        return
    todo = [k for k, r in rows.data["rows"].items() if r.get("path") and "nll_llama" not in r and "same_as" not in r]
    if not todo:
        return
    print(f"llama.cpp measures {len(todo)} files")
    jobs = [{"model": rows[k]["path"], "lora": rows[k].get("lora_path")} for k in todo]
    done = run_llama({"perplexity": jobs, "windows": windows}, args, work)
    for key, result in zip(todo, done["perplexity"]):
        rows.put(key, {"nll_llama": result["nll"], "llama_s": result["seconds"]})
        print(f"  llama  {key}: ppl {math.exp(result['nll']):.3f}")


def qbara_rows(rows: Rows, dense, tokenizer, tables: dict, budgets, windows, args, work: Path) -> None:
    """qbara's ILP mixes at every stock budget (plain and Fisher costs), and the QA-HiRA fine-tune on the
    Fisher mix with INT4 G32 in place of gguf:q4_1."""
    from qbara.export import export_gguf

    informative = [b for b in budgets if b <= args.lossless_bits + BITS_TOL]  # above the Q4_1 file: the Fisher mix only
    fine_tuned = spread(informative, args.ft_budgets) if args.ft_steps > 0 else []
    for budget in budgets:
        label = f"{budget:.3f}"
        variants = [("qbara-ilp", "plain", False)] if budget in informative else []
        variants.append(("qbara-ilp+fisher", "fisher", False))
        if budget in informative:  # rounding weighted as llama.cpp's imatrix path, by the imatrix or the Fisher
            variants += [("qbara+imatrix", "imatrix", False), ("qbara+fisher-rnd", "fisher-rnd", False)]
        if budget in fine_tuned:
            variants.append(("qahira", "fisher", True))
        for kind, which, swap in variants:
            key = f"{kind}:{label}"
            if key in rows and Path(rows[key]["path"]).exists():
                continue
            t = time.perf_counter()
            model, allocation = ilp_model(dense, tables[which], budget, swap_q4_1=swap,
                                          importance=tables["importance"].get(which))
            extra = {}
            if swap:
                extra = qahira_finetune(model, tokenizer, args)
                if not extra["adapted"]:
                    print(f"  {key}: the allocation has no Q4_1 (INT4 G32) layer to fine-tune; skipped")
                    continue
            path = work / f"{kind.replace('+', '-')}-{label}.gguf"
            export_gguf(model, tokenizer, path, overwrite=True)
            row = {"kind": kind, "name": label, "budget": budget, "path": str(path), **tensor_stats(path),
                   "allocated": dict(sorted(_format_counts(allocation.configs).items())),
                   "nll_qbara": qbara_nll(model, windows), "seconds": time.perf_counter() - t, **extra}
            rows.put(key, row)
            print(f"  qbara  {key}: {row['bits']:.3f} bits/param, ppl {math.exp(row['nll_qbara']):.3f}")


def lq_rows(rows: Rows, dense, tokenizer, fisher, budgets, windows, args, work: Path) -> None:
    """LQ-LoRA over the GGML formats: W ≈ Q + L1 L2 with Q in the ILP's format, Fisher-weighted, the rank-r
    factors shipped as a llama.cpp LoRA adapter GGUF and counted in the budget (base + adapter). Three kinds: F32
    factors with plain rounding ("lq-rR"), with Fisher-weighted rounding ("+fisher-rnd"), and that with F16
    factors ("+f16": half the adapter's bits)."""
    import copy

    from qbara import lq_prepare
    from qbara.errors import QbaraError
    from qbara.export import export_gguf, export_gguf_lora
    from qbara.lq.configs import gguf_configs
    from qbara.lq.filesize import FileBudget
    from qbara.lq.tables import error_table

    variants = ((False, "f32"), (True, "f32"), (True, "f16"))
    for budget, (weighted, dtype) in ((b, v) for b in budgets for v in variants):
        kind = f"lq-r{args.lq_rank}" + ("+fisher-rnd" if weighted else "") + ("+f16" if dtype == "f16" else "")
        key = f"{kind}:{budget:.3f}"
        if key in rows and (rows[key].get("infeasible") or Path(rows[key]["path"]).exists()):
            continue
        file = FileBudget.of_model(dense, adapter_format=dtype, rank=args.lq_rank)
        importance = fisher if weighted else None
        # dq_mode / patience as the stored lq rows were made (2026-11-29: the then defaults "shared" and 1)
        table = error_table(dense, gguf_configs(), rank=args.lq_rank, fisher=fisher, seed=args.seed,
                            iters=args.lq_table_iters, importance=importance, dq_mode="shared")  # cached after one
        t = time.perf_counter()
        try:
            model = lq_prepare(copy.deepcopy(dense), budget=budget, rank=args.lq_rank, fisher=fisher,
                               configs=gguf_configs(), table=table, table_iters=args.lq_table_iters, file_budget=file,
                               seed=args.seed, progress=False, importance=importance, patience=1)
        except QbaraError as err:
            rows.put(key, {"kind": kind, "name": f"{budget:.3f}", "budget": budget, "infeasible": str(err)[:200]})
            print(f"  {key}: infeasible ({file.file_bits_per_param(0):.3f} bits/param fixed)")
            continue
        base, adapter = work / f"{kind}-{budget:.3f}.gguf", work / f"{kind}-{budget:.3f}.adapter.gguf"
        export_gguf(model, tokenizer, base, separate_lora=True, overwrite=True)
        export_gguf_lora(model, adapter, overwrite=True, dtype=dtype)
        stats, extra = tensor_stats(base), tensor_stats(adapter)
        bits = stats["bits"] + extra["bits"] * extra["params"] / stats["params"]
        row = {"kind": kind, "name": f"{budget:.3f}", "budget": budget, "path": str(base), "lora_path": str(adapter),
               **stats, "bits": bits, "adapter_bits": bits - stats["bits"], "adapter_dtype": dtype,
               "allocated": _format_counts(model.qbara.lq.allocation.configs),
               "nll_qbara": qbara_nll(model, windows), "seconds": time.perf_counter() - t}
        rows.put(key, row)
        print(f"  qbara  {key}: {bits:.3f} bits/param (adapter {row['adapter_bits']:.3f}), ppl "
              f"{math.exp(row['nll_qbara']):.3f}")


PAIRED_KINDS = ("qbara+imatrix", "qbara+fisher-rnd")


def window_nlls(model, windows) -> list[float]:
    """Mean next-token NLL of each window (each from an empty context), in qbara's fp32 forward."""
    import torch

    with torch.no_grad():
        return [nll(model(torch.tensor([w])).logits[0].double().numpy(), w) for w in windows]


def paired_rows(rows: Rows, windows, budgets) -> None:
    """At every budget below the lossless one, the best stock file (by llama.cpp's perplexity; by qbara's when
    llama.cpp's is not measured) against each of qbara's files of PAIRED_KINDS, window by window over `windows`
    (all of Hamlet's): the mean per-window NLL difference and its standard error. A verdict needs the mean beyond
    2 standard errors; otherwise inconclusive. Per-window NLLs are kept per file (rows[key]["window_nlls"]), so
    reruns only add files."""
    from qbara.models.smollm2 import load_gguf_as_hf

    def nlls(key):
        key = rows[key].get("same_as", key)  # a duplicate file: its original's
        if len(rows[key].get("window_nlls", [])) != len(windows):
            model, _ = load_gguf_as_hf(rows[key]["path"])
            rows.put(key, {"window_nlls": window_nlls(model, windows)})
        return np.array(rows[key]["window_nlls"])

    paired = rows.data.setdefault("paired", {})
    for budget in budgets:
        label = f"{budget:.3f}"
        engine = "nll_llama" if all("nll_llama" in r for r in rows.data["rows"].values()
                                    if r["kind"].startswith("stock")) else "nll_qbara"
        stock = [(k, r) for k, r in rows.data["rows"].items()
                 if r["kind"].startswith("stock") and r["bits"] <= budget + BITS_TOL and engine in r]
        mine = [f"{kind}:{label}" for kind in PAIRED_KINDS if f"{kind}:{label}" in rows]
        if not stock or not mine:
            continue
        best = min(stock, key=lambda kr: kr[1][engine])[0]
        reference = nlls(best)
        for key in mine:
            paired[key] = {"stock": best, **paired_difference(nlls(key), reference)}
            rows.save()
            p = paired[key]
            print(f"  paired {key} vs {best}: ΔNLL {p['mean_diff']:+.4f} ± {p['se']:.4f} (ppl x{p['ppl_ratio']:.4f}), "
                  f"{p['verdict']}")


def paired_difference(candidate, reference) -> dict:
    """Per-window NLLs of a qbara file and a stock file on the same windows: the mean difference, its standard
    error (sample SD / √windows), the perplexity ratio exp(mean) and the verdict (beyond 2 SE, else inconclusive)."""
    diff = np.asarray(candidate, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    mean, se = float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff)))
    verdict = "qbara better" if mean + 2 * se < 0 else "stock better" if mean - 2 * se > 0 else "inconclusive"
    return {"windows": len(diff), "mean_diff": mean, "se": se, "ppl_ratio": math.exp(mean), "verdict": verdict}


def spread(values: list, n: int) -> list:
    """At most n of the sorted `values`, evenly spread, the first and last included."""
    if n >= len(values):
        return list(values)
    if n <= 1:
        return values[-1:] if n == 1 else []
    return [values[round(k * (len(values) - 1) / (n - 1))] for k in range(n)]


def _format_counts(configs) -> dict:
    from collections import Counter

    return dict(Counter(c.format.removeprefix("gguf:") for c in configs.values()))


def error_tables(dense, fisher, imatrix, args) -> dict:
    """The rank-0 error tables of the GGML formats: plain, Fisher-weighted costs, and Fisher-weighted costs of the
    rounding weighted by the imatrix / by the Fisher ("importance": the rounding importance of each)."""
    from qbara.lq.configs import gguf_configs
    from qbara.lq.tables import error_table

    configs = gguf_configs()
    importance = {"imatrix": imatrix, "fisher-rnd": fisher}
    tables = {which: error_table(dense, configs, rank=0, fisher=None if which == "plain" else fisher,
                                 importance=importance.get(which), seed=args.seed, progress=True)
              for which in ("plain", "fisher", "imatrix", "fisher-rnd")}
    return {**tables, "importance": importance}


def fisher_of(dense, sequences, work: Path):
    from qbara.lq.fisher import fisher_information, load_fisher, save_fisher

    return _kept(work / "fisher.safetensors", load_fisher, save_fisher,
                 lambda: fisher_information(dense, sequences, progress=True))


def importance_of(dense, sequences, work: Path) -> dict:
    """qbara's importance matrix of the calibration sequences (kept in WORK/imatrix.safetensors)."""
    from qbara.lq.imatrix import importance_matrix, load_importance, save_importance

    return _kept(work / "imatrix.safetensors", load_importance, save_importance,
                 lambda: importance_matrix(dense, sequences, progress=True))


def _kept(path: Path, load, save, compute):
    """load(path) if the file exists, else compute() saved there with save(value, path)."""
    if path.exists():
        return load(path)
    value = compute()
    save(value, path)
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8, help="Hamlet windows scored (from its start)")
    parser.add_argument("--stock", nargs="+", default=list(STOCK))
    parser.add_argument("--calib-plays", nargs="+", default=list(CALIB_PLAYS))
    parser.add_argument("--calib", type=int, default=64, help="calibration windows (imatrix and Fisher)")
    parser.add_argument("--ft-steps", type=int, default=60, help="QA-HiRA steps (0: no fine-tune rows)")
    parser.add_argument("--ft-batch", type=int, default=8)
    parser.add_argument("--ft-seq", type=int, default=256)
    parser.add_argument("--ft-rank", type=int, default=16)
    parser.add_argument("--ft-lr", type=float, default=1e-2)
    parser.add_argument("--lq-rank", type=int, default=4, help="LQ-LoRA rows' rank (0: none)")
    parser.add_argument("--lq-budgets", type=int, default=2,
                        help="LQ-LoRA rows at the largest N budgets below the stock Q4_1 file")
    parser.add_argument("--ft-budgets", type=int, default=3, help="QA-HiRA rows at N budgets up to the Q4_1 file")
    parser.add_argument("--lq-table-iters", type=int, default=2, help="decomposition iterations per table entry")
    parser.add_argument("--llama-ppl", action=argparse.BooleanOptionalAction, default=True,
                        help="llama.cpp's perplexity of every file (off: qbara's alone, e.g. for a second calibration "
                             "seed while another run holds the cores: ggml's spin-waiting threads slow ~10x then)")
    parser.add_argument("--paired", action=argparse.BooleanOptionalAction, default=True,
                        help="per-window paired comparison with the best stock file over all of Hamlet (qbara's "
                             "forward; mean ΔNLL ± standard error, a verdict beyond 2 SE)")
    parser.add_argument("--report", action="store_true", help="only rewrite the table and plot from OUT's json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-python", default=LLAMA_PYTHON)
    parser.add_argument("--llama-threads", type=int, default=1, help="llama.cpp threads (ggml's threads spin-wait "
                        "for each other: more threads than free cores makes it many times slower)")
    parser.add_argument("--extra-bufts", action="store_true", help="llama.cpp's AMX / repacked buffers (off: "
                        "AMX faults on this machine)")
    parser.add_argument("--work", default="/tmp/qbara-gguf-mix", help="folder for the GGUF files (kept)")
    parser.add_argument("--out", default=str(HERE.parent / "results" / "gguf_mix"))
    parser.add_argument("--fresh", action="store_true", help="recompute every row")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    import torch

    torch.set_num_threads(args.threads)
    from qbara.data import shakespeare_text
    from qbara.models import load_model
    from qbara.models.smollm2 import smollm2_gguf_path

    from gguf_llamacpp import write_f32_copy

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    rows = Rows(out / "gguf_mix.json", args.fresh)
    if args.report:
        return report(rows, out)
    dense, tokenizer = load_model("smollm2-135m")
    dense.eval()
    ids = tokenizer(shakespeare_text("hamlet"), add_special_tokens=False)["input_ids"]
    windows = [ids[k * args.window:(k + 1) * args.window] for k in range(args.windows)]
    assert len(windows[-1]) == args.window, "Hamlet is shorter than --windows x --window tokens"
    stored = rows.data.get("setting", {})
    if any(stored.get(k) not in (None, getattr(args, k)) for k in ("window", "windows", "seed")):
        sys.exit(f"{rows.path} was measured with another --window / --windows / --seed ({stored}); pass --fresh "
                 f"or another --out")
    rows.data["setting"] = {"window": args.window, "windows": args.windows, "calib_plays": args.calib_plays,
                            "calib": args.calib, "lq_rank": args.lq_rank, "seed": args.seed,
                            "ft": [args.ft_steps, args.ft_batch, args.ft_seq, args.ft_rank, args.ft_lr]}
    if "dense:f32" not in rows:
        rows.put("dense:f32", {"kind": "dense", "name": "f32", "nll_qbara": qbara_nll(dense, windows)})
    print(f"dense (the shipped Q4_1 file in fp32): ppl {math.exp(rows['dense:f32']['nll_qbara']):.3f}")

    dense_f32 = work / "dense-f32.gguf"
    if not dense_f32.exists():
        write_f32_copy(smollm2_gguf_path(), dense_f32)
    rows.put("dense:f32", {"path": str(dense_f32), **tensor_stats(dense_f32)})
    sequences = calibration(tokenizer, args)
    importance = importance_of(dense, sequences, work)
    imatrix = work / "imatrix.npz"  # the same statistic by GGUF tensor name, for llama.cpp
    if not imatrix.exists():
        np.savez(imatrix, **gguf_imatrix(importance))

    stock_rows(rows, dense_f32, imatrix, args, work)
    imatrix_bytes_check(rows, dense_f32, imatrix)
    mark_duplicates(rows)
    llama_nll(rows, windows, args, work)
    qbara_stock_nll(rows, windows)
    budgets = sorted({round(r["bits"], 6) for r in rows.data["rows"].values() if r["kind"].startswith("stock")})
    # Matrices stored as Q4_1 are lossless on this model: budgets above the stock Q4_1 file are degenerate.
    args.lossless_bits = rows["stock:Q4_1"]["bits"] if "stock:Q4_1" in rows else max(budgets)
    fisher = fisher_of(dense, sequences, work)
    tables = {**error_tables(dense, fisher, importance, args), "fisher_matrices": fisher}
    qbara_rows(rows, dense, tokenizer, tables, budgets, windows, args, work)
    mark_duplicates(rows)
    llama_nll(rows, windows, args, work)
    if args.lq_rank > 0:
        lq_budgets = [b for b in budgets if b < args.lossless_bits - BITS_TOL][-args.lq_budgets:]
        lq_rows(rows, dense, tokenizer, tables["fisher_matrices"], lq_budgets, windows, args, work)
        llama_nll(rows, windows, args, work)
    copy_duplicates(rows)
    if args.paired:
        every = [ids[k * args.window:(k + 1) * args.window] for k in range(len(ids) // args.window)]
        paired_rows(rows, every, [b for b in budgets if b < args.lossless_bits - BITS_TOL])
    rows.data["wall_s"] = rows.data.get("wall_s", 0.0) + time.perf_counter() - start
    report(rows, out)


def report(rows: Rows, out: Path) -> None:
    rows.save()
    (out / "gguf_mix.md").write_text(markdown(rows.data))
    plot(rows.data, out / "gguf_mix.png")
    print(markdown(rows.data))


def markdown(data: dict) -> str:
    """The table: every row by file size, perplexity from both engines, and the best stock mix at each budget."""
    rows = sorted((r for r in data["rows"].values() if "bits" in r and r["kind"] != "dense"),
                  key=lambda r: (r["bits"], r["kind"]))
    dense = data["rows"]["dense:f32"]
    s = data["setting"]
    lines = [f"# GGUF mixes vs llama.cpp's own at equal size: SmolLM2-135M, Hamlet ({s['windows']} windows of "
             f"{s['window']} tokens)", "",
             f"Dense reference (the shipped Q4_1 file in fp32): perplexity {math.exp(dense['nll_qbara']):.3f} "
             f"(qbara). Bits/param: tensor data of the whole file (embedding and norms included) over all "
             f"{dense['params']:,} parameters.", "",
             "| file | kind | bits/param | ppl (llama.cpp) | ppl (qbara) | types |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['kind']} | {r['bits']:.3f} | {_ppl(r.get('nll_llama'))} | "
                     f"{_ppl(r.get('nll_qbara'))} | {', '.join(f'{k} {v}' for k, v in sorted(r['types'].items()))} |")
    lines += ["", "Best stock file at or below each budget vs qbara's:", "",
              "| budget | best stock (llama.cpp ppl) | qbara-ilp+fisher | qbara+imatrix | qbara+fisher-rnd "
              "| qahira (fine-tuned) |", "|---|---|---|---|---|---|"]
    for b in sorted({r["budget"] for r in rows if "budget" in r}):
        stock = [r for r in rows if r["kind"].startswith("stock") and r["bits"] <= b + BITS_TOL and "nll_llama" in r]
        best = min(stock, key=lambda r: r["nll_llama"]) if stock else None
        mine = {r["kind"]: r for r in rows if r.get("budget") == b}
        named = f"{best['kind']} {best['name']} {_ppl(best['nll_llama'])}" if best else "-"
        lines.append(f"| {b:.3f} | {named}" + "".join(f" | {_ppl(mine.get(k, {}).get('nll_llama'))}"
                               for k in ("qbara-ilp+fisher", "qbara+imatrix", "qbara+fisher-rnd", "qahira")) + " |")
    if data.get("paired"):
        lines += ["", "Paired per-window comparison with the best stock file at each budget (all of Hamlet, each "
                      "window's NLL in qbara's forward; mean ΔNLL = qbara - stock ± standard error; a verdict needs "
                      "|mean| > 2 SE):", "",
                  "| qbara file | against (its bits/param) | windows | mean ΔNLL ± SE | ppl ratio | verdict |",
                  "|---|---|---|---|---|---|"]
        for key, p in sorted(data["paired"].items(), key=lambda kv: (kv[0].split(":")[1], kv[0])):
            mine, theirs = (data["rows"].get(k, {}).get("bits") for k in (key, p["stock"]))
            smaller = (f"; the stock file is {mine - theirs:.3f} bits/param smaller: not an equal-size comparison"
                       if mine is not None and theirs is not None and mine - theirs > BITS_TOL else "")
            size = f" ({theirs:.3f})" if theirs is not None else ""
            lines.append(f"| {key} | {p['stock']}{size} | {p['windows']} | {p['mean_diff']:+.4f} ± {p['se']:.4f} | "
                         f"{p['ppl_ratio']:.4f} | {p['verdict']}{smaller} |")
    if "wall_s" in data:
        lines += ["", f"Wall time: {data['wall_s']:.0f} s (all runs of this result)."]
    return "\n".join(lines) + "\n"


def _ppl(nll) -> str:
    return "-" if nll is None else f"{math.exp(nll):.3f}"


def plot(data: dict, path: Path) -> Path:
    """Perplexity (llama.cpp) vs file bits/param, one series per kind, the dense reference as a line."""
    from qbara.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    kinds = sorted({r["kind"] for r in data["rows"].values() if r["kind"] != "dense"})
    for kind in kinds:
        pts = sorted((r["bits"], math.exp(r["nll_llama"])) for r in data["rows"].values()
                     if r["kind"] == kind and "nll_llama" in r)
        if pts:
            ax.plot(*zip(*pts), marker="o", linestyle="-" if kind.startswith("qbara") else "--", label=kind)
    ax.axhline(math.exp(data["rows"]["dense:f32"]["nll_qbara"]), color="grey", linewidth=0.8,
               label="dense (shipped Q4_1 in fp32)")
    ax.set_xlabel("file bits/param (tensor data, embedding included)")
    ax.set_ylabel("Hamlet perplexity (llama.cpp)")
    ax.set_title("SmolLM2-135M: qbara's GGUF mixes vs llama.cpp's at equal size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()
