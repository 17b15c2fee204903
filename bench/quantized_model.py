"""Benchmark: resident bytes and train-step time of the quantized SmolLM2 against the same model dense.

Both models carry the same LoRA adapters (r=8 on all linear layers), so one step is the real
QLoRA-style forward + backward. Timings alternate between the models and report medians; the
ratios (quantized / dense) are what to read, since this machine is noisy.

    python bench/quantized_model.py [--model smollm2-135m] [--batch 4] [--seq 128] [--repeats 5]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from qbara import AdapterConfig, QuantConfig, prepare
from qbara.adapters import attach_adapters
from qbara.commands.quantize import model_bytes
from qbara.models import load_model


def step_time(model, ids) -> float:
    start = time.perf_counter()
    loss = model(ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--formats", default="nf4,int4")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    base, _ = load_model(args.model)
    adapter = AdapterConfig("lora", rank=8, alpha=16)
    dense = attach_adapters(copy.deepcopy(base), adapter)
    models = {"dense fp32": dense}
    for fmt in args.formats.split(","):
        quant = QuantConfig(fmt) if fmt.startswith("nf") else QuantConfig(fmt, 32)
        models[quant.label] = prepare(copy.deepcopy(base), quant, adapter)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq))
    times = {name: [] for name in models}
    for name, model in models.items():
        step_time(model, ids)  # warm-up
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name].append(step_time(model, ids))
    ref_bytes, ref_time = model_bytes(dense), statistics.median(times["dense fp32"])
    print(f"model {args.model}, batch {args.batch} x seq {args.seq}, LoRA r=8 on all linear layers, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'model':<24}{'resident MB':>12}{'bytes ratio':>12}{'step s':>9}{'time ratio':>11}")
    for name, model in models.items():
        size, t = model_bytes(model), statistics.median(times[name])
        print(f"{name:<24}{size / 1e6:>12.1f}{size / ref_bytes:>12.3f}{t:>9.3f}{t / ref_time:>11.3f}")


if __name__ == "__main__":
    main()
