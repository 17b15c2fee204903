"""Benchmark: SmolLM2-135M GGUFs with gguf:iq3_s / gguf:iq3_xxs matrices, loaded and run by real llama.cpp
(llama-cpp-python).

The models: every down_proj (576 x 1536, the only SmolLM2 linears whose rows 256 divides) in gguf:iq3_s (one file)
or gguf:iq3_xxs (another), the other linears in gguf:q8_0, written by qbara's mixed export. Checks, all in one
llama.cpp interpreter (--llama-python, protocol and helpers of bench/gguf_llamacpp.py):
  1. bytes: each IQ3_S / IQ3_XXS tensor of a file equals libggml's own ggml_quantize_chunk of the fp32 weight
     qbara started from (no importance), byte for byte;
  2. weights: every quantized tensor decoded by ggml's to_float equals qbara's dequantized weight;
  3. perplexity on the first --tokens tokens of Hamlet (no BOS): llama.cpp running each file vs qbara's own
     dequantized model, and the file dequantized to F32 with an F32 KV cache (plain fp32 arithmetic: must match
     qbara to ~1e-5). The dense model and an all-q8_0 file give the reference perplexities.

    nice -n 5 python3 bench/gguf_iq3s_llamacpp.py [--tokens 256] [--threads 2] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

import gguf_llamacpp as gl  # noqa: E402  (bench/gguf_llamacpp.py: its worker helpers and comparisons)

IQ3 = ("iq3_s", "iq3_xxs")


def worker(job_path: str) -> None:
    """Re-quantize each listed fp32 weight with libggml, compare with the file's bytes; then gl.worker's job."""
    import ctypes

    import llama_cpp

    job = json.loads(Path(job_path).read_text())
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    same = []
    for t in job["requantize"]:
        x = np.ascontiguousarray(np.load(t["source"]), dtype=np.float32)
        out = np.zeros(t["n_bytes"], dtype=np.uint8)
        lib.ggml_quantize_chunk(t["type"], x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
        raw = np.fromfile(t["file"], dtype=np.uint8, count=t["n_bytes"], offset=t["offset"])
        same.append(bool(np.array_equal(out, raw)))
    Path(job["requantize_result"]).write_text(json.dumps(same))
    gl.worker(job_path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--play", default="hamlet")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--llama-python", default=gl.LLAMA_PYTHON)
    parser.add_argument("--extra-bufts", action="store_true")
    parser.add_argument("--out", default=str(HERE.parent / "results"))
    parser.add_argument("--worker")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    start = time.perf_counter()

    import torch
    from gguf import GGUFReader

    from qbara import QuantConfig, prepare
    from qbara.data import shakespeare_text
    from qbara.export import export_gguf
    from qbara.models import load_model

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="qbara-iq3s-"))
    model, tokenizer = load_model("smollm2-135m")
    model.eval()
    text = shakespeare_text(args.play, max_chars=6000)
    ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"][:args.tokens]]
    assert len(ids) == args.tokens, "text too short for --tokens"
    ref_dense = gl.qbara_logits(model, ids)
    layers = len(model.model.layers)
    sources = {}
    for i in range(layers):
        w = model.model.layers[i].mlp.down_proj.weight.detach().float().numpy()
        sources[f"blk.{i}.ffn_down.weight"] = work / f"down{i}.npy"
        np.save(sources[f"blk.{i}.ffn_down.weight"], w)

    files, refs, weights, reports = {}, {}, [], {}
    for label, down in (("q8_0", "gguf:q8_0"), *((k, f"gguf:{k}") for k in IQ3)):
        m, _ = load_model("smollm2-135m")
        m.eval()
        configs = {}
        for i in range(layers):
            for sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                        "mlp.gate_proj", "mlp.up_proj"):
                configs[f"model.layers.{i}.{sub}"] = QuantConfig("gguf:q8_0")
            configs[f"model.layers.{i}.mlp.down_proj"] = QuantConfig(down)
        t = time.perf_counter()
        prepare(m, configs)
        print(f"{label}: quantized in {time.perf_counter() - t:.0f} s")
        refs[label] = gl.qbara_logits(m, ids)
        files[label] = work / f"smollm2-{label}.gguf"
        reports[label] = export_gguf(m, tokenizer, files[label], overwrite=True)
        print(reports[label].summary())
        weights.append(gl.expected_weights(m, files[label], f"{label} file vs qbara's weights", work / label))
        del m
    runs, requantize = [{"name": "q8_0", "model": str(files["q8_0"])}], []
    for k in IQ3:
        f32 = work / f"smollm2-{k}.F32.gguf"
        gl.write_f32_copy(files[k], f32)
        runs += [{"name": k, "model": str(files[k])}, {"name": f"F32 {k}", "model": str(f32), "kv_f32": True}]
        requantize += [{"name": t.name, "offset": int(t.data_offset), "n_bytes": int(t.n_bytes), "file": str(files[k]),
                        "type": int(t.tensor_type), "source": str(sources[t.name])}
                       for t in GGUFReader(str(files[k])).tensors if t.tensor_type.name == k.upper()]
    for k, run in enumerate(runs):
        run["out"] = str(work / f"logits-{k}.npy")
    job = {"runs": runs, "weights": weights, "ids": ids, "text": text, "threads": args.threads, "n_ctx": args.n_ctx,
           "extra_bufts": args.extra_bufts, "result": str(work / "llama_result.json"), "requantize": requantize,
           "requantize_result": str(work / "requantize.json")}
    (work / "job.json").write_text(json.dumps(job))
    subprocess.run(["nice", "-n", "5", args.llama_python, str(HERE), "--worker", str(work / "job.json")], check=True)
    result = json.loads((work / "llama_result.json").read_text())
    checks, infos = result["weights"], result["runs"]
    llama = {run["name"]: np.load(run["out"]) for run in runs}
    same = json.loads((work / "requantize.json").read_text())
    print(f"IQ3 tensors equal to libggml's ggml_quantize_chunk of the same weight: {sum(same)}/{len(same)}")

    rows = [gl.compare("q8_0", "all-q8_0 file vs qbara's model", llama["q8_0"], refs["q8_0"], ids)]
    for k in IQ3:
        rows += [
            gl.compare(k, f"{k.upper()} down_proj file vs qbara's model", llama[k], refs[k], ids),
            gl.compare(f"{k} F32", "F32 copy, F32 KV vs qbara's model", llama[f"F32 {k}"], refs[k], ids),
            gl.compare("dense", f"qbara {k} model vs dense (quantization error)", refs[k], ref_dense, ids,
                       control=True, engines=(f"qbara {k}", "qbara dense")),
        ]
    results = {"tokens": len(ids), "play": args.play, "requantize_equal": [sum(same), len(same)],
               "weight_checks": checks, "rows": rows, "llama_runs": infos,
               "files": {k: {"formats": r.format_counts, "bytes": r.size_bytes,
                             "linear_bits_per_param": r.linear_bits_per_param} for k, r in reports.items()},
               "dense_ppl": float(np.exp(gl.nll(ref_dense, ids))), "seconds": time.perf_counter() - start}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gguf_iq3s_llamacpp.json").write_text(json.dumps(results, indent=1))
    lines = [f"# SmolLM2-135M with IQ3_S / IQ3_XXS down_proj in llama.cpp ({len(ids)} tokens of {args.play}, no BOS)",
             "", f"- IQ3_S / IQ3_XXS tensors equal to libggml's ggml_quantize_chunk of the same fp32 weight: "
             f"{sum(same)}/{len(same)}",
             *(f"- ggml to_float decode, {c['label']}: {c['exact']}/{c['tensors']} tensors bit-exact"
               for c in checks),
             f"- dense model perplexity (qbara): {results['dense_ppl']:.3f}", "",
             "| case | what | ppl llama.cpp | ppl qbara | max abs dlogit | top-1 agree |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['what']} | {r['ppl_first']:.3f} | {r['ppl_second']:.3f} | "
              f"{r['max_abs_diff']:.2e} | {r['top1_agree']:.3f} |" for r in rows]
    (out / "gguf_iq3s_llamacpp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
