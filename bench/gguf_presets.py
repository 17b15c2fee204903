"""Benchmark: qbara's reading of llama.cpp's presets (`qbara.export.gguf.presets`) against llama.cpp's quantizer.

Each model (default smollm2-135m and gemma3-270m; tiny-llama3-256: a random 2-layer LLaMA-3 with 256-wide rows,
an untied head and LLaMA-3 rotary scaling, where the presets' embedding is a K-quant and the file holds rope_freqs)
is exported by qbara as an all-F32 GGUF; llama.cpp's
`llama_model_quantize` (llama-cpp-python, --llama-python) writes every preset from it, without and with an
importance matrix (all ones: only whether one is given changes the type choice). For every file: the per-tensor
types llama.cpp chose vs `preset_types`, and the tensor-data bytes vs `preset_file(...).tensor_bytes`.
Results: OUT/gguf_presets.json and .md; the fixture keeps the entries of models not run.

    nice -n 10 python3 bench/gguf_presets.py [--models smollm2-135m gemma3-270m] [--out bench/results/gguf_presets]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from gguf_mix import run_llama

from gguf_llamacpp import LLAMA_PYTHON

PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_S", "Q4_K_M", "Q5_K_S",
           "Q5_K_M", "Q6_K", "Q8_0", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_M")
IMATRIX_PRESETS = ("Q4_0", "Q5_0", "IQ4_NL", "IQ4_XS")  # the presets whose types an imatrix changes


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def load(name: str):
    """(model, tokenizer): an embedded model, or tiny-llama3-256 (random, seed 0)."""
    from qbara.models import load_model, tiny_llama

    if name != "tiny-llama3-256":
        return load_model(name)
    model, tokenizer = tiny_llama(seed=0, hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512)
    model.config.rope_parameters = dict(LLAMA3_ROPE)  # only the exported rope_freqs tensor reads it
    return model, tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--work", default="/tmp/qbara-gguf-presets")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gguf_presets"))
    parser.add_argument("--llama-python", default=LLAMA_PYTHON)
    parser.add_argument("--llama-threads", type=int, default=1)
    parser.add_argument("--extra-bufts", action="store_true")
    parser.add_argument("--fixture", default=str(Path(__file__).parent.parent / "tests" / "fixtures" /
                                                 "llamacpp_presets.json"),
                        help="where llama.cpp's type choices go for tests/export/test_gguf_presets.py")
    args = parser.parse_args(argv)

    from gguf import GGUFReader

    from qbara.export import export_gguf
    from qbara.export.gguf.presets import preset_file

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    fixture = json.loads(Path(args.fixture).read_text()) if Path(args.fixture).exists() else {}
    for name in args.models:
        fixture.pop(name, None)
        model, tokenizer = load(name)
        src = work / f"{name}-f32.gguf"
        if not src.exists():
            export_gguf(model, tokenizer, src, embedding_type="f32", dense_type="f32", overwrite=True)
        imatrix = work / f"{name}-ones.npz"
        np.savez(imatrix, **{t.name: np.ones(int(t.shape[0]), dtype=np.float32)
                             for t in GGUFReader(str(src)).tensors if len(t.shape) == 2})
        jobs = []
        for preset in args.presets:
            for imx in ((False, True) if preset in IMATRIX_PRESETS else (False,)):
                dst = work / f"{name}-{preset}{'-imatrix' if imx else ''}.gguf"
                if not dst.exists():
                    jobs.append({"src": str(src), "dst": str(dst), "ftype": preset,
                                 "imatrix": str(imatrix) if imx else None})
        if jobs:
            print(f"{name}: llama.cpp writes {len(jobs)} files", flush=True)
            run_llama({"quantize": jobs, "windows": []}, args, work)
        for preset in args.presets:
            for imx in ((False, True) if preset in IMATRIX_PRESETS else (False,)):
                dst = work / f"{name}-{preset}{'-imatrix' if imx else ''}.gguf"
                theirs = {t.name: (t.tensor_type.name.lower(), int(t.n_bytes)) for t in GGUFReader(str(dst)).tensors}
                ours = preset_file(model, preset, imatrix=imx)
                wrong = {n: [k, theirs.get(n, ("missing",))[0]] for n, k in ours.types.items()
                         if theirs.get(n, ("missing",))[0] != k}
                real = sum(b for _, b in theirs.values())
                kinds = [k for k, _ in theirs.values()]
                common = max(set(kinds), key=kinds.count)
                entry = fixture.setdefault(name, {"config": model.config.to_dict(), "presets": {}})
                entry["presets"][f"{preset}{'+imatrix' if imx else ''}"] = {
                    "tensor_bytes": real, "default": common, "others": {n: k for n, (k, _) in theirs.items()
                                                                        if k != common}}
                rows.append({"model": name, "preset": preset, "imatrix": imx, "tensors": len(theirs),
                             "types_differ": len(wrong), "examples": dict(list(wrong.items())[:4]),
                             "bytes_llamacpp": real, "bytes_qbara": ours.tensor_bytes,
                             "file_bytes_llamacpp": dst.stat().st_size, "bits_per_param": ours.bits_per_param})
                r = rows[-1]
                print(f"  {preset:<7}{' +imatrix' if imx else '         '} types differ {r['types_differ']:>3}, "
                      f"tensor bytes llama.cpp {real:,} qbara {ours.tensor_bytes:,}", flush=True)
    Path(args.fixture).write_text(json.dumps(fixture, indent=0, sort_keys=True, default=str) + "\n")
    (out / "gguf_presets.json").write_text(json.dumps({"rows": rows, "time": time.ctime()}, indent=1))
    lines = ["# llama.cpp's preset types: qbara's `preset_types` vs llama.cpp's quantizer (llama-cpp-python)", "",
             "| model | preset | imatrix | tensors | types differ | tensor bytes llama.cpp | qbara | file bytes |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['preset']} | {'yes' if r['imatrix'] else 'no'} | {r['tensors']} | "
              f"{r['types_differ']} | {r['bytes_llamacpp']:,} | {r['bytes_qbara']:,} | {r['file_bytes_llamacpp']:,} |"
              for r in rows]
    (out / "gguf_presets.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
