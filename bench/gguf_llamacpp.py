"""Benchmark: qbara's GGUF export checked in real llama.cpp (llama-cpp-python) on SmolLM2-135M.

Files checked (issue #13):
  lora   INT4 G32 base (written exactly as Q4_1) + plain LoRA (rank 8, alpha 16, all 210 linears; lora_B ~
         N(0, --lora-std^2), lora_A as initialised): export_gguf(..., separate_lora=True) + export_gguf_lora,
         the adapter written in F32 and in F16 (dtype="f16").
  mixed  a mixed-format base: down_proj gguf:q4_k / gguf:q6_k alternating by layer, the 576-wide q/k/v/o/gate/up
         cycling through gguf:q4_0 / q5_0 / q8_0; export_gguf.

Three checks:
  1. weights: every quantized tensor of each file decoded by llama.cpp's own ggml (`ggml_get_type_traits(type)
     ->to_float` from libggml-base, the decoder its kernels implement) must equal qbara's dequantized weight
     (q/k rows in llama.cpp's rotary order) bit for bit.
  2. logits, as shipped: llama.cpp runs the files (the base alone, base + `lora_path`, the mixed file) on the
     same token ids as qbara (the first --tokens tokens of Hamlet with qbara's tokenizer; no BOS on either
     side), logits of every position compared: max |Δlogit|, relative error ‖Δ‖/‖ref‖, top-1 agreement,
     mean NLL from both engines. llama.cpp quantizes activations for quantized matmuls (Q8_1 for Q4_1, Q8_0
     for Q4_0/Q5_0/Q8_0, Q8_K for K-quants) and keeps the KV cache in F16, so this has an error floor; the
     reference row (the shipped SmolLM2 Q4_1 file vs qbara's load_model of it) shows that floor for a file
     qbara did not write.
  3. logits, F32: the same files with every tensor dequantized to F32 (a copy written here with gguf-py) and an
     F32 KV cache: llama.cpp's arithmetic is then plain fp32, so the pair must match qbara to ~1e-5, which
     makes a wrong scale or layout impossible to miss.
Negative controls: the adapter not applied, applied with alpha = r (s·r left out: a copy of the adapter file
with adapter.lora.alpha patched), and the mixed file against another model.

The llama.cpp side runs in a separate interpreter (--llama-python, default /work/llama-venv/bin/python, which
has numpy + llama_cpp only) as `gguf_llamacpp.py --worker JOB.json`: this file imports only the standard
library and numpy at top level so it can be its own worker. Logits come back as .npy files.

    nice -n 10 python3 bench/gguf_llamacpp.py [--tokens 128] [--threads 2] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LLAMA_PYTHON = "/work/llama-venv/bin/python"
HERE = Path(__file__).resolve()


# ======================================================================================= llama.cpp side
def worker(job_path: str) -> None:
    """Run JOB.json in llama.cpp: decode the listed tensors with ggml, eval the ids for every run."""
    job = json.loads(Path(job_path).read_text())
    if not job.get("extra_bufts", False):
        plain_cpu_buffers()
    result = {"weights": [ggml_decode_check(check) for check in job.get("weights", [])],
              "runs": [eval_run(run, job) for run in job["runs"]]}
    Path(job["result"]).write_text(json.dumps(result))


def plain_cpu_buffers() -> None:
    """Make llama-cpp-python load weights into plain CPU buffers: no AMX / repacked buffer types. This VM's CPU
    advertises AMX but its tile instructions fault (SIGILL in ggml's AMX matmul); the plain path runs ggml-cpu's
    vec_dot kernels."""
    import llama_cpp

    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def model_params():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = model_params


def ggml_decode_check(check: dict) -> dict:
    """Decode each listed tensor of a GGUF file with ggml's to_float; compare with the expected .npy."""
    import ctypes

    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))

    class Traits(ctypes.Structure):  # struct ggml_type_traits (include/ggml.h)
        _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                    ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                    ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                    ("from_float_ref", ctypes.c_void_p)]

    lib.ggml_get_type_traits.restype = ctypes.POINTER(Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    to_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)
    out = {"label": check["label"], "tensors": 0, "exact": 0, "max_abs_diff": 0.0, "types": {}, "mismatched": []}
    for t in check["tensors"]:
        traits = lib.ggml_get_type_traits(t["type"]).contents
        name = traits.type_name.decode()
        if name.upper() != t["type_name"] or t["n_bytes"] != t["n_elements"] // traits.blck_size * traits.type_size:
            raise RuntimeError(f"ggml type traits disagree with the file for {t['name']}: {name} vs {t['type_name']}")
        raw = np.fromfile(check["file"], dtype=np.uint8, count=t["n_bytes"], offset=t["offset"])
        got = np.empty(t["n_elements"], dtype=np.float32)
        to_float_t(traits.to_float)(raw.ctypes.data, got.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                    t["n_elements"])
        want = np.load(t["expect"]).reshape(-1)
        diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
        out["tensors"] += 1
        out["exact"] += int(np.array_equal(got, want))
        out["max_abs_diff"] = max(out["max_abs_diff"], diff)
        out["types"][t["type_name"]] = out["types"].get(t["type_name"], 0) + 1
        if not np.array_equal(got, want):
            out["mismatched"].append(t["name"])
    return out


def eval_run(run: dict, job: dict) -> dict:
    """Load one model (+ adapter), evaluate the ids with logits_all, save the logits."""
    import llama_cpp
    from llama_cpp import Llama

    ids = job["ids"]
    t = time.perf_counter()
    kwargs = dict(model_path=run["model"], logits_all=True, n_ctx=job["n_ctx"], n_batch=job["n_ctx"],
                  n_threads=job["threads"], n_threads_batch=job["threads"], verbose=False, seed=0)
    if run.get("lora"):
        kwargs.update(lora_path=run["lora"], lora_scale=float(run.get("lora_scale", 1.0)))
    if run.get("kv_f32"):
        kwargs.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm = Llama(**kwargs)
    info = {"name": run["name"], "n_vocab": llm.n_vocab()}
    if job.get("text") is not None:
        toks = llm.tokenize(job["text"].encode("utf-8"), add_bos=False, special=False)
        info["tokenizer_same_ids"] = toks[:len(ids)] == ids
    llm.reset()
    llm.eval(ids)
    np.save(run["out"], np.array(llm.scores[:len(ids)], dtype=np.float32))
    info["seconds"] = time.perf_counter() - t
    llm.close()
    return info


def run_llama(runs: list[dict], weights: list[dict], ids: list[int], text: str, args, work: Path):
    """Run the job in the llama.cpp interpreter: (name -> (n_tokens, n_vocab) logits, run infos, weight checks)."""
    for k, run in enumerate(runs):
        run["out"] = str(work / f"logits-{k}.npy")
    job = {"runs": runs, "weights": weights, "ids": ids, "text": text, "threads": args.threads,
           "n_ctx": args.n_ctx, "extra_bufts": args.extra_bufts, "result": str(work / "llama_result.json")}
    job_path = work / "llama_job.json"
    job_path.write_text(json.dumps(job))
    cmd = [args.llama_python, str(HERE), "--worker", str(job_path)]
    if shutil.which("nice"):
        cmd = ["nice", "-n", "10"] + cmd
    subprocess.run(cmd, check=True)
    result = json.loads(Path(job["result"]).read_text())
    for w in result["weights"]:
        print(f"  ggml decode {w['label']}: {w['exact']}/{w['tensors']} tensors bit-exact, max |Δw| "
              f"{w['max_abs_diff']:.3g} ({', '.join(f'{k} {v}' for k, v in sorted(w['types'].items()))})")
    for r in result["runs"]:
        print(f"  llama.cpp {r['name']}: {r['seconds']:.1f} s, tokenizer ids "
              f"{'match' if r.get('tokenizer_same_ids') else 'DIFFER'}")
    logits = {run["name"]: np.load(run["out"]) for run in runs}
    return logits, result["runs"], result["weights"]


# ======================================================================================= comparisons
def nll(logits: np.ndarray, ids: list[int], rows: int = 64) -> float:
    """Mean next-token negative log-likelihood over positions 0..n-2 (float64), `rows` positions at a time (a
    262k vocabulary makes a whole window's float64 log-softmax several GiB)."""
    target = np.asarray(ids[1:])
    total = 0.0
    for i in range(0, len(target), rows):
        x = logits[i:min(i + rows, len(target))].astype(np.float64)
        x -= x.max(axis=1, keepdims=True)
        logz = np.log(np.exp(x).sum(axis=1))
        total += float(np.sum(logz - x[np.arange(len(x)), target[i:i + len(x)]]))
    return total / len(target)


def compare(case: str, what: str, first: np.ndarray, ref: np.ndarray, ids: list[int], control: bool = False,
            engines=("llama.cpp", "qbara")) -> dict:
    """Row: `first` (llama.cpp's logits unless `engines` says otherwise) against `ref` (qbara's)."""
    d = first.astype(np.float64) - ref.astype(np.float64)
    row = {
        "case": case, "what": what, "control": control, "engines": list(engines),
        "max_abs_diff": float(np.abs(d).max()),
        "mean_abs_diff": float(np.abs(d).mean()),
        "rel_error": float(np.linalg.norm(d) / np.linalg.norm(ref.astype(np.float64))),
        "top1_agree": float(np.mean(first.argmax(1) == ref.argmax(1))),
        "nll_first": nll(first, ids), "nll_second": nll(ref, ids),
    }
    row["ppl_first"], row["ppl_second"] = float(np.exp(row["nll_first"])), float(np.exp(row["nll_second"]))
    print(f"  {case:10s} {what:62s} max|Δ| {row['max_abs_diff']:9.2e}  rel {row['rel_error']:.2e}  "
          f"top1 {row['top1_agree']:.3f}  NLL {row['nll_first']:.4f} vs {row['nll_second']:.4f}")
    return row


# ======================================================================================= qbara side
def qbara_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def set_scaling(model, scales: dict | None = None) -> dict:
    """Set every adapter's scaling (to 0 when `scales` is None: adapters off); returns the previous ones."""
    from qbara.adapters import adapter_layers

    layers = adapter_layers(model)
    old = {name: layer.scaling for name, layer in layers.items()}
    for name, layer in layers.items():
        layer.scaling = 0.0 if scales is None else scales[name]
    return old


def dense_weight(module):
    """fp32 weight qbara computes with: the base of an adapter layer, a quantized layer dequantized, or dense."""
    import torch

    if hasattr(module, "base_weight"):
        return module.base_weight()
    if hasattr(module, "dequantize"):
        return module.dequantize(torch.float32)
    return module.weight.detach().float()


def expected_weights(model, path: Path, label: str, folder: Path) -> dict:
    """A decode check for the worker: every quantized tensor of the GGUF at `path`, with qbara's fp32 weight
    for it (rows in llama.cpp's rotary order for attn_q / attn_k) saved as .npy."""
    from gguf import GGUFReader

    from qbara.export.gguf import LINEARS, llama_rope_permutation

    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    sources = {"token_embd.weight": model.get_input_embeddings()}
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for i, layer in enumerate(model.model.layers):
        for sub, gguf_name in LINEARS:
            sources[f"blk.{i}.{gguf_name}.weight"] = (layer.get_submodule(sub), heads.get(gguf_name))
    tensors = []
    for t in GGUFReader(str(path)).tensors:
        if t.tensor_type.name in ("F32", "F16"):
            continue  # norms: written as floats
        src = sources[t.name]
        if isinstance(src, tuple):
            module, n_head = src
            w = dense_weight(module)
            if n_head:
                w = w[llama_rope_permutation(w.shape[0], n_head)]
        else:
            w = src.weight.detach().float()
        expect = folder / f"{t.name}.npy"
        np.save(expect, w.contiguous().numpy().astype(np.float32))
        tensors.append({"name": t.name, "offset": int(t.data_offset), "n_bytes": int(t.n_bytes),
                        "n_elements": int(t.n_elements), "type": int(t.tensor_type),
                        "type_name": t.tensor_type.name, "expect": str(expect)})
    return {"label": label, "file": str(path), "tensors": tensors}


def write_f32_copy(src: Path, dst: Path) -> None:
    """The GGUF at `src` with every tensor dequantized to F32 (gguf-py's decoders) and the same metadata."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
    from gguf.quants import dequantize

    reader = GGUFReader(str(src))
    writer = GGUFWriter(str(dst), str(reader.fields["general.architecture"].contents()))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type":
            writer.add_uint32(key, int(LlamaFileType.ALL_F32))
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        data = dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def patch_alpha(src: Path, dst: Path, alpha: float) -> float:
    """Copy a LoRA GGUF with adapter.lora.alpha rewritten in place (float32); returns the value read back."""
    from gguf import GGUFReader

    shutil.copyfile(src, dst)
    reader = GGUFReader(str(dst), "r+")
    field = reader.fields["adapter.lora.alpha"]
    field.parts[field.data[0]][0] = np.float32(alpha)
    reader.data.flush()
    del reader
    return float(GGUFReader(str(dst)).fields["adapter.lora.alpha"].contents())


MIXED_CYCLE = ("gguf:q4_0", "gguf:q5_0", "gguf:q8_0")
MIXED_SUBS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj")


def mixed_configs(model) -> dict:
    """down_proj (d_in 1536 = 6 x 256): gguf:q4_k on even layers, gguf:q6_k on odd ones; the 576-wide others
    cycle through MIXED_CYCLE by (layer + sublayer index)."""
    from qbara import QuantConfig

    per_layer = {}
    for i in range(len(model.model.layers)):
        for j, sub in enumerate(MIXED_SUBS):
            per_layer[f"model.layers.{i}.{sub}"] = QuantConfig(MIXED_CYCLE[(i + j) % len(MIXED_CYCLE)])
        per_layer[f"model.layers.{i}.mlp.down_proj"] = QuantConfig("gguf:q4_k" if i % 2 == 0 else "gguf:q6_k")
    return per_layer


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two GGUF files hold the same tensors (names, types, bytes)."""
    from gguf import GGUFReader

    ta = {t.name: t for t in GGUFReader(str(a)).tensors}
    tb = {t.name: t for t in GGUFReader(str(b)).tensors}
    return ta.keys() == tb.keys() and all(
        ta[n].tensor_type == tb[n].tensor_type and np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data))
        for n in ta)


# ======================================================================================= main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--play", default="hamlet")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--lora-std", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--llama-python", default=LLAMA_PYTHON)
    parser.add_argument("--extra-bufts", action="store_true",
                        help="let llama.cpp use its extra weight buffer types (AMX, repacking); off by default "
                             "because AMX faults on this machine")
    parser.add_argument("--out", default=str(HERE.parent / "results"), help="folder for gguf_llamacpp.json/.md")
    parser.add_argument("--keep", default=None, help="folder to keep the GGUF files in (default: temporary)")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from qbara import AdapterConfig, QuantConfig, prepare
    from qbara.adapters import adapter_layers
    from qbara.data import shakespeare_text
    from qbara.export import export_gguf, export_gguf_lora
    from qbara.models import load_model
    from qbara.models.smollm2 import smollm2_gguf_path

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qbara-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    shipped_path = smollm2_gguf_path()

    model, tokenizer = load_model("smollm2-135m")
    model.eval()
    text = shakespeare_text(args.play, max_chars=4000)
    ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"][:args.tokens]]
    assert len(ids) == args.tokens, "text too short for --tokens"
    print(f"{args.play}: {len(ids)} tokens; llama-cpp-python in {args.llama_python}")

    # ---------------------------------------------------------------- qbara: logits, exports, expected weights
    t = time.perf_counter()
    weights = [expected_weights(model, shipped_path, "shipped SmolLM2 Q4_1 file vs qbara load_model",
                                work / "expect-shipped")]
    ref_shipped = qbara_logits(model, ids)

    # LoRA pair
    prepare(model, QuantConfig("int4", block_size=32), AdapterConfig("lora", rank=args.rank, alpha=args.alpha))
    gen = torch.Generator().manual_seed(args.seed)
    layers = adapter_layers(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * args.lora_std)
    dw = [float(a.delta_weight().norm() / a.base_weight().norm()) for a in layers.values()]
    scaling = sorted({a.scaling for a in layers.values()})
    ref_adapter = qbara_logits(model, ids)
    saved = set_scaling(model)          # adapters off
    ref_base = qbara_logits(model, ids)
    set_scaling(model, saved)
    base_path, lora_path = work / "smollm2-int4g32-base.gguf", work / "smollm2-lora-r8.gguf"
    base_report = export_gguf(model, tokenizer, base_path, separate_lora=True, overwrite=True)
    lora_report = export_gguf_lora(model, lora_path, overwrite=True)
    lora16_path = work / "smollm2-lora-r8.f16.gguf"
    lora16_report = export_gguf_lora(model, lora16_path, overwrite=True, dtype="f16")
    wrong_path = work / "smollm2-lora-r8-alpha-eq-r.gguf"
    wrong_alpha = patch_alpha(lora_path, wrong_path, float(args.rank))
    weights.append(expected_weights(model, base_path, "exported INT4 G32 base vs qbara's base weights",
                                    work / "expect-base"))
    base_is_shipped = same_tensors(base_path, shipped_path)
    print(f"LoRA rank {args.rank}, s = {scaling}, lora_B ~ N(0, {args.lora_std}^2): "
          f"||dW||/||W|| {min(dw):.4f}..{max(dw):.4f} over {len(dw)} layers")
    print(base_report.summary())
    print(lora_report.summary())
    print(lora16_report.summary())
    print(f"control adapter file: adapter.lora.alpha {lora_report.alpha:g} -> {wrong_alpha:g}")
    print(f"exported base holds the shipped file's tensors byte for byte: {base_is_shipped}")
    del model, layers

    # mixed-format base
    model, _ = load_model("smollm2-135m")
    model.eval()
    prepare(model, mixed_configs(model))
    ref_mixed = qbara_logits(model, ids)
    mixed_path = work / "smollm2-mixed.gguf"
    mixed_report = export_gguf(model, tokenizer, mixed_path, overwrite=True)
    weights.append(expected_weights(model, mixed_path, "exported mixed-format base vs qbara's weights",
                                    work / "expect-mixed"))
    print(mixed_report.summary())
    del model

    # F32 copies (every tensor dequantized): llama.cpp then computes in plain fp32
    base_f32, mixed_f32 = work / "smollm2-int4g32-base.F32.gguf", work / "smollm2-mixed.F32.gguf"
    write_f32_copy(base_path, base_f32)
    write_f32_copy(mixed_path, mixed_f32)
    qbara_s = time.perf_counter() - t
    print(f"qbara side: {qbara_s:.0f} s")

    # ---------------------------------------------------------------- llama.cpp
    t = time.perf_counter()
    runs = [
        {"name": "shipped", "model": str(shipped_path)},
        {"name": "base", "model": str(base_path)},
        {"name": "base+lora", "model": str(base_path), "lora": str(lora_path)},
        {"name": "base+lora(alpha=r)", "model": str(base_path), "lora": str(wrong_path)},
        {"name": "base+lora(f16)", "model": str(base_path), "lora": str(lora16_path)},
        {"name": "base (f32 KV)", "model": str(base_path), "kv_f32": True},
        {"name": "mixed", "model": str(mixed_path)},
        {"name": "F32 base", "model": str(base_f32), "kv_f32": True},
        {"name": "F32 base+lora", "model": str(base_f32), "lora": str(lora_path), "kv_f32": True},
        {"name": "F32 base+lora(alpha=r)", "model": str(base_f32), "lora": str(wrong_path), "kv_f32": True},
        {"name": "F32 base+lora(f16)", "model": str(base_f32), "lora": str(lora16_path), "kv_f32": True},
        {"name": "F32 mixed", "model": str(mixed_f32), "kv_f32": True},
    ]
    llama, llama_info, weight_checks = run_llama(runs, weights, ids, text, args, work)
    llama_s = time.perf_counter() - t
    print(f"llama.cpp side: {llama_s:.0f} s")

    # ---------------------------------------------------------------- the table
    print("\nlogits (llama.cpp vs qbara unless noted):")
    L = llama
    rows = [
        compare("reference", "shipped Q4_1 file vs qbara load_model (same weights)", L["shipped"], ref_shipped, ids),
        compare("lora", "base GGUF alone vs qbara base (adapters off)", L["base"], ref_base, ids),
        compare("lora", "base GGUF + LoRA GGUF vs qbara adapter model", L["base+lora"], ref_adapter, ids),
        compare("lora", "base GGUF + F16 LoRA GGUF vs qbara adapter model", L["base+lora(f16)"], ref_adapter, ids),
        compare("lora", "base GGUF alone, F32 KV cache vs qbara base", L["base (f32 KV)"], ref_base, ids),
        compare("lora", "control: base alone (LoRA not applied) vs qbara adapter", L["base"], ref_adapter, ids,
                control=True),
        compare("lora", f"control: LoRA file with alpha = r ({args.rank:g}) vs qbara adapter",
                L["base+lora(alpha=r)"], ref_adapter, ids, control=True),
        compare("lora", "effect of the adapter in qbara", ref_adapter, ref_base, ids, control=True,
                engines=("qbara adapter", "qbara base")),
        compare("lora", "effect of the adapter in llama.cpp", L["base+lora"], L["base"], ids, control=True,
                engines=("llama.cpp base+LoRA", "llama.cpp base")),
        compare("lora F32", "F32 base alone vs qbara base", L["F32 base"], ref_base, ids),
        compare("lora F32", "F32 base + LoRA GGUF vs qbara adapter model", L["F32 base+lora"], ref_adapter, ids),
        compare("lora F32", "F32 base + F16 LoRA GGUF vs qbara adapter model", L["F32 base+lora(f16)"], ref_adapter,
                ids),
        compare("lora F32", "control: F32 base alone vs qbara adapter", L["F32 base"], ref_adapter, ids,
                control=True),
        compare("lora F32", f"control: F32 base + LoRA alpha = r ({args.rank:g}) vs qbara adapter",
                L["F32 base+lora(alpha=r)"], ref_adapter, ids, control=True),
        compare("mixed", "mixed-format GGUF vs qbara mixed model", L["mixed"], ref_mixed, ids),
        compare("mixed", "control: mixed GGUF vs qbara INT4 G32 base (other model)", L["mixed"], ref_base, ids,
                control=True),
        compare("mixed F32", "F32 mixed vs qbara mixed model", L["F32 mixed"], ref_mixed, ids),
    ]
    wall = time.perf_counter() - start

    results = {
        "setup": {
            "model": "SmolLM2-135M-Instruct (the bundled Q4_1 GGUF, dequantized)", "play": args.play,
            "tokens": len(ids), "bos": False, "threads": args.threads, "n_ctx": args.n_ctx,
            "llama_extra_bufts": args.extra_bufts, "llama_cpp_python": llama_version(args),
            "lora": {"rank": args.rank, "alpha": args.alpha, "scaling": scaling, "lora_B_std": args.lora_std,
                     "rel_update_min": min(dw), "rel_update_max": max(dw), "layers": len(dw),
                     "file_alpha": lora_report.alpha, "control_alpha": wrong_alpha,
                     "base_formats": base_report.format_counts, "base_bytes": base_report.size_bytes,
                     "adapter_bytes": lora_report.size_bytes, "adapters_separate": base_report.adapters_separate,
                     "base_equals_shipped_tensors": base_is_shipped},
            "mixed": {"formats": mixed_report.format_counts, "bytes": mixed_report.size_bytes,
                      "lossless": mixed_report.lossless, "linear_bits_per_param": mixed_report.linear_bits_per_param,
                      "down_proj": "gguf:q4_k (even layers) / gguf:q6_k (odd layers)",
                      "others": f"{' / '.join(MIXED_CYCLE)} cycling over (layer + sublayer index)"},
            "tokenizer_same_ids": all(r.get("tokenizer_same_ids") for r in llama_info),
        },
        "weights": weight_checks,
        "rows": rows,
        "seconds": {"qbara": qbara_s, "llama_cpp": llama_s, "wall": wall},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gguf_llamacpp.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "gguf_llamacpp.md").write_text(markdown(results))
    print(f"wrote {out / 'gguf_llamacpp.json'} and .md; wall {wall:.0f} s")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def llama_version(args) -> str:
    out = subprocess.run([args.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                         capture_output=True, text=True)
    return out.stdout.strip()


def markdown(results: dict) -> str:
    s, lo, mx = results["setup"], results["setup"]["lora"], results["setup"]["mixed"]
    lines = [
        "# qbara GGUF export checked in llama.cpp (SmolLM2-135M)",
        "",
        f"`bench/gguf_llamacpp.py`, llama-cpp-python {s['llama_cpp_python']} on CPU, {s['threads']} threads"
        + ("." if s["llama_extra_bufts"] else
           ", use_extra_bufts=False (no AMX / repacked weights: AMX instructions fault on this VM)."),
        "",
        f"- **lora**: INT4 G32 base (written as Q4_1: "
        f"{', '.join(f'{k} {v}' for k, v in sorted(lo['base_formats'].items()))}"
        f"; its tensors equal the shipped SmolLM2 Q4_1 file's byte for byte: {lo['base_equals_shipped_tensors']}) "
        f"+ plain LoRA rank {lo['rank']}, alpha {lo['alpha']:g} (s = {lo['scaling'][0]:g}) on all {lo['layers']} "
        f"linears, lora_B ~ N(0, {lo['lora_B_std']}²), lora_A as initialised: ‖ΔW‖/‖W‖ = "
        f"{lo['rel_update_min']:.3f}..{lo['rel_update_max']:.3f}. Adapter file: alpha {lo['file_alpha']:g}, "
        f"{lo['adapter_bytes'] / 1e6:.1f} MB; control copy with alpha {lo['control_alpha']:g} (= r).",
        f"- **mixed**: down_proj {mx['down_proj']}, the others {mx['others']}: "
        f"{', '.join(f'{k} {v}' for k, v in sorted(mx['formats'].items()))} "
        f"({mx['linear_bits_per_param']:.2f} bits/param over the linears, {mx['bytes'] / 1e6:.1f} MB, lossless "
        f"{mx['lossless']}).",
        "",
        "## Weights: decoded by llama.cpp's ggml (`type_traits->to_float`) vs qbara's fp32 weights",
        "",
        "| file | quantized tensors | bit-exact | max abs Δw | types |",
        "|---|---|---|---|---|",
    ]
    for w in results["weights"]:
        lines.append(f"| {w['label']} | {w['tensors']} | {w['exact']} | {w['max_abs_diff']:.3g} | "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(w['types'].items()))} |")
    lines += [
        "",
        f"## Logits: the first {s['tokens']} tokens of {s['play'].title()}",
        "",
        f"qbara's tokenizer, no BOS; llama.cpp evaluates the same ids (its own tokenizer gives the same ids: "
        f"{s['tokenizer_same_ids']}). Relative error = ‖Δ‖_F / ‖second‖_F over all {s['tokens']} × vocab logits; "
        f"NLL = mean next-token negative log-likelihood over the sequence (ppl = exp NLL). First / second = "
        f"llama.cpp / qbara unless the row names the two. Rows without F32 run the files as written (llama.cpp "
        f"quantizes activations for quantized matmuls, F16 KV cache); F32 rows run a copy of the file with every "
        f"tensor dequantized to F32 and an F32 KV cache (plain fp32 arithmetic).",
        "",
        "| case | comparison | max abs Δlogit | mean abs Δlogit | rel. error | top-1 agree | NLL first | NLL second |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        what = r["what"] if r["engines"] == ["llama.cpp", "qbara"] else f"{r['what']} ({' / '.join(r['engines'])})"
        lines.append(f"| {r['case']} | {what} | {r['max_abs_diff']:.2e} | {r['mean_abs_diff']:.2e} | "
                     f"{r['rel_error']:.2e} | {r['top1_agree']:.3f} | {r['nll_first']:.4f} | {r['nll_second']:.4f} |")
    sec = results["seconds"]
    lines += ["", f"Wall time {sec['wall']:.0f} s (qbara side {sec['qbara']:.0f} s, llama.cpp side "
                  f"{sec['llama_cpp']:.0f} s).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()
