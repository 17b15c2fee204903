"""Benchmark: `qbara gguf --match PRESET` (`write_mixed_gguf`) on SmolLM2-135M against llama.cpp's own PRESET file,
without and with an importance matrix from the same calibration sequences, scored by llama.cpp.

The mixed file is written by the library (or taken from --mix if it exists: e.g. the one the CLI wrote), llama.cpp's
files by `llama_model_quantize` (llama-cpp-python) from qbara's F32 export. Every file is scored by llama.cpp on the
first --windows windows of --window tokens of Hamlet (not in the calibration), each from an empty context; the
paired per-window NLL difference against each llama.cpp file has its standard error, a verdict beyond 2 SE.
Results: OUT/gguf_mix_command.json / .md.

    nice -n 10 python3 bench/gguf_mix_command.py [--preset Q4_K_M] [--windows 16] [--mix FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from gguf_mix import gguf_imatrix, paired_difference, run_llama, tensor_stats

from gguf_llamacpp import LLAMA_PYTHON


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--preset", default="Q4_K_M")
    parser.add_argument("--calibration", nargs="+", default=["macbeth", "othello"], help="Shakespeare plays")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--costs", default="fisher")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--mix", default=None, help="a mixed GGUF already written with these settings")
    parser.add_argument("--work", default="/tmp/qbara-gguf-mix-command")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gguf_mix_command"))
    parser.add_argument("--llama-python", default=LLAMA_PYTHON)
    parser.add_argument("--llama-threads", type=int, default=1)
    parser.add_argument("--extra-bufts", action="store_true")
    args = parser.parse_args(argv)

    from qbara.data import shakespeare_text
    from qbara.export import export_gguf
    from qbara.export.gguf.mix import mixed_calibration, write_mixed_gguf
    from qbara.lq.imatrix import importance_matrix
    from qbara.models import load_model

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    texts = [shakespeare_text(p) for p in args.calibration]
    mix = Path(args.mix) if args.mix else work / f"mix-{args.preset}.gguf"
    t = time.perf_counter()
    if not mix.exists():
        report = write_mixed_gguf(args.model, mix, match=args.preset, calibration=texts, costs=args.costs,
                                  samples=args.samples, length=args.length)
        print(report.summary(), flush=True)
    mix_seconds = time.perf_counter() - t
    dense, tokenizer = load_model(args.model)
    dense.eval()
    src = work / f"{args.model}-f32.gguf"
    if not src.exists():
        export_gguf(dense, tokenizer, src, embedding_type="f32", dense_type="f32", overwrite=True)
    imatrix = work / "imatrix.npz"
    if not imatrix.exists():
        sequences = mixed_calibration(tokenizer, texts, args.samples, args.length, 0)
        np.savez(imatrix, **gguf_imatrix(importance_matrix(dense, sequences)))
    files = {"qbara mix": mix}
    jobs = []
    for kind, imx in (("llama.cpp", None), ("llama.cpp+imatrix", imatrix)):
        dst = work / f"{args.preset}{'-imatrix' if imx else ''}.gguf"
        files[f"{kind} {args.preset}"] = dst
        if not dst.exists():
            jobs.append({"src": str(src), "dst": str(dst), "ftype": args.preset, "imatrix": str(imx) if imx else None})
    ids = tokenizer(shakespeare_text("hamlet"), add_special_tokens=False)["input_ids"]
    windows = [ids[k * args.window:(k + 1) * args.window] for k in range(args.windows)]
    result = run_llama({"quantize": jobs, "windows": windows,
                        "perplexity": [{"model": str(p)} for p in files.values()]}, args, work)
    rows = {}
    for (name, path), ppl in zip(files.items(), result["perplexity"]):
        rows[name] = {"path": str(path), "file_bytes": path.stat().st_size, **tensor_stats(path),
                      "nll": ppl["nll"], "ppl": math.exp(ppl["nll"]), "window_nlls": ppl["window_nlls"]}
    mine = rows["qbara mix"]
    paired = {name: paired_difference(mine["window_nlls"], r["window_nlls"]) for name, r in rows.items()
              if name != "qbara mix"}
    data = {"setting": vars(args) | {"mix_seconds": mix_seconds}, "rows": rows, "paired": paired}
    (out / "gguf_mix_command.json").write_text(json.dumps(data, indent=1, default=str))
    lines = [f"# `qbara gguf --match {args.preset}` vs llama.cpp's {args.preset} ({args.model}); Hamlet, "
             f"{args.windows} windows of {args.window} tokens, scored by llama.cpp", "",
             f"Calibration: {', '.join(args.calibration)} ({args.samples} x {args.length} tokens), {args.costs} costs, "
             f"weighted rounding; the imatrix for llama.cpp from the same sequences.", "",
             "| file | file bytes | tensor bytes | bits/param | ppl (llama.cpp) | ΔNLL vs it ± SE | verdict |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        p = paired.get(name)
        diff = f"{p['mean_diff']:+.4f} ± {p['se']:.4f}" if p else "-"
        lines.append(f"| {name} | {r['file_bytes']:,} | {round(r['bits'] * r['params'] / 8):,} | {r['bits']:.3f} | "
                     f"{r['ppl']:.3f} | {diff} | {p['verdict'] if p else '-'} |")
    (out / "gguf_mix_command.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
