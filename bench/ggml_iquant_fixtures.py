"""The sha256 of the bytes libggml's ggml_quantize_chunk writes for IQ4_NL / IQ4_XS / IQ3_S / IQ3_XXS on the test
inputs of tests/quant/test_ggml_iquants.py, without and with an importance (the hashes committed there).

Run with the system python: `PYTHONPATH=src python3 bench/ggml_iquant_fixtures.py [--llama-python PATH]`.
It builds the inputs with the tests' own helpers, then runs itself under the llama-cpp-python venv as a worker
(`--worker DIR`, numpy + llama_cpp only) that calls ggml_quantize_chunk through ctypes on libggml-base.so,
one row at a time where each row has its own importance (as the K-quant fixtures were made).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

GGML_TYPES = {"iq4_nl": 20, "iq4_xs": 23, "iq3_s": 21, "iq3_xxs": 18}  # ggml.h's enum ggml_type


def worker(folder: Path) -> None:
    """Quantize each case listed in folder/cases.json with libggml; write folder/<case>.bin."""
    import ctypes

    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    for case in json.loads((folder / "cases.json").read_text()):
        x = np.ascontiguousarray(np.load(folder / case["x"]), dtype=np.float32)
        imp = np.ascontiguousarray(np.load(folder / case["imp"]), dtype=np.float32) if case["imp"] else None
        rows, cols = x.shape
        row_bytes = lib.ggml_row_size(case["type"], cols)
        out = np.zeros((rows, row_bytes), dtype=np.uint8)
        if imp is None or imp.ndim == 1:
            lib.ggml_quantize_chunk(case["type"], x.ctypes.data, out.ctypes.data, 0, rows, cols,
                                    None if imp is None else imp.ctypes.data)
        else:
            for r in range(rows):
                row, dst, w = x[r].copy(), np.zeros(row_bytes, np.uint8), imp[r].copy()
                lib.ggml_quantize_chunk(case["type"], row.ctypes.data, dst.ctypes.data, 0, 1, cols, w.ctypes.data)
                out[r] = dst
        out.tofile(folder / f"{case['name']}.bin")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-python", default="/work/llama-venv/bin/python")
    parser.add_argument("--worker", type=Path)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.quant.test_ggml_iquants import CASES, SHARED_CASES

    with tempfile.TemporaryDirectory() as tmp:
        folder, cases = Path(tmp), []
        for name, (x, imp) in {**CASES, **SHARED_CASES}.items():
            np.save(folder / f"{name}.x.npy", x().numpy())
            if imp is not None:
                np.save(folder / f"{name}.imp.npy", imp().numpy())
            for fmt, type_id in GGML_TYPES.items():
                cases.append({"name": f"{fmt}-{name}", "type": type_id, "x": f"{name}.x.npy",
                              "imp": f"{name}.imp.npy" if imp is not None else None})
        (folder / "cases.json").write_text(json.dumps(cases))
        subprocess.run([args.llama_python, __file__, "--worker", str(folder)], check=True)
        for case in cases:
            digest = hashlib.sha256((folder / f"{case['name']}.bin").read_bytes()).hexdigest()
            print(f'    "{case["name"]}": "{digest}",')


if __name__ == "__main__":
    main()
