"""Memory and time at real model sizes: qbara quantize-on-load vs load-then-quantize vs transformers+bitsandbytes.

Random LLaMA models (bf16 safetensors in shards of <= 2 GB, written once into --cache by a streamed generator: one
tensor in memory at a time, each seeded by its name) of ~0.1B, ~0.5B, 1.1B (TinyLlama's shape: hidden 2048, FFN
5632, 22 layers, 32 heads, 4 KV heads, vocab 32000) and 6.7B parameters (`7b`, Llama-2-7B's shape: hidden 4096,
FFN 11008, 32 layers, 32 heads, 32 KV heads; 13.5 GB of disk). Each case runs in a fresh subprocess (with
--cgroup-limit in its own memory cgroup), so every peak is its own:
  qbara-eager   load_model(folder) (fp32 copy of the model) + prepare(NF4, LoRA r16)   -- qbara <= 0.1
  qbara-nf4     load_model(folder, quant=NF4) + prepare(LoRA r16)                        -- quantize on load
  qbara-int4    load_model(folder, quant=INT4-G32) + prepare(QA-HiRA)
  bnb-nf4       from_pretrained(BitsAndBytesConfig nf4, fp32 compute) + PEFT LoRA r16
and, on request (--cases), LQ-LoRA init (budget 3.0, rank 64, QLoRA's nf2/3/4/8 candidates, 2 table and 3
decomposition iterations: the memory is the point, not the quality):
  qbara-lq-dense  load_model(folder) (fp32) + lq_prepare(model)                          -- qbara <= 0.1
  qbara-lq-stream lq_prepare(folder): table, decompositions and load streamed from the shards
Measured per case: load+prepare wall time; peak RSS (VmHWM, includes the memory-mapped checkpoint pages) and
peak anonymous memory (RssAnon sampled every 10 ms: the process's own allocations); RSS after loading (and how much
of it is file-backed: the checkpoint left mapped); then --steps training steps (batch 1 x 256 tokens, AdamW on
the adapters, fp32 compute), each step's own peak anonymous memory and RSS and what it leaves behind; with
--cgroup-limit the cgroup's peak charge and its OOM kills. qbara's cases bound glibc's heap growth once loaded, as
qbara.train does (qbara.memory.bound_heap_growth; --heap-default leaves it). Each case's record is written to
OUT/cases/SIZE-CASE.json as it goes (a finished case is not rerun: the run resumes), its output to OUT/logs.
Prints the ratios qbara/bnb and writes scale.json, scale.md, scale.png and the extrapolation to 7B/13B/70B.

    python bench/scale.py --out bench/results/scale            # 0.1b-1.1b (about 15 min on 2 CPU cores)
    python bench/scale.py --sizes 7b --cgroup-limit 16G        # the 7B row (a load takes ~30 min on 2 cores)
    python bench/scale.py --sizes 0.1b --steps 2 --out /tmp/s  # quick look
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

from tqdm.auto import tqdm

from measure import PeakAnon, proc_status, proc_status_bytes, release_freed_memory, timed_training_steps

SIZES = {  # hidden, ffn, layers, heads, kv heads, vocab
    "0.1b": (768, 2048, 12, 12, 4, 32000),
    "0.5b": (1536, 4096, 16, 12, 4, 32000),
    "1.1b": (2048, 5632, 22, 32, 4, 32000),
    "7b": (4096, 11008, 32, 32, 32, 32000),  # Llama-2-7B's shape
}
CASES = ("qbara-eager", "qbara-nf4", "qbara-int4", "bnb-nf4")
LQ_CASES = ("qbara-lq-dense", "qbara-lq-stream")
GiB = 1024 ** 3


def parameter_count(size: str) -> int:
    h, f, n, heads, kv, v = SIZES[size]
    head_dim = h // heads
    attention = 2 * h * h + 2 * h * kv * head_dim
    return n * (attention + 3 * h * f + 2 * h) + 2 * v * h + h


SHARD_BYTES = 2 * 10 ** 9  # at most 2 GB per shard: a 7B model in 7 files, as transformers' 2GB shards


def _tensor_plan(size: str):
    """The config of `size` and its (key, shape) list in checkpoint order, from a weightless skeleton."""
    import torch
    from transformers import LlamaConfig

    from qbara.models.streaming import empty_model

    h, f, n, heads, kv, v = SIZES[size]
    config = LlamaConfig(hidden_size=h, intermediate_size=f, num_hidden_layers=n, num_attention_heads=heads,
                         num_key_value_heads=kv, vocab_size=v, max_position_embeddings=2048, tie_word_embeddings=False,
                         dtype="bfloat16")
    return config, [(key, tuple(t.shape)) for key, t in empty_model(config, torch.bfloat16).state_dict().items()]


def _random_tensor(key: str, shape: tuple[int, ...]):
    """The bf16 values of one tensor, seeded by its name (so any tensor can be made alone, in any order): norms
    are ones, every other weight N(0, 0.02) as transformers initializes a LLaMA."""
    import torch

    if key.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.empty(shape).normal_(0.0, 0.02, generator=generator).to(torch.bfloat16)


def _shards(plan) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards, size = [[]], 0
    for key, shape in plan:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += nbytes
    return shards


def _write_shard(path: Path, tensors) -> None:
    """One safetensors file written a tensor at a time: the header (from shapes alone), then each tensor's bytes
    as soon as it is made; written to a temporary name and renamed, so a present shard is a complete one."""
    import torch

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in tensors:
        end = offset + 2 * math.prod(shape)
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        for key, shape in tensors:
            fh.write(_random_tensor(key, shape).view(torch.uint8).numpy())
        fh.flush()
        os.fsync(fh.fileno())
    tmp.rename(path)


def make_model(size: str, cache: Path) -> Path:
    """A random bf16 LLaMA of `size` as sharded safetensors in cache/size, made once and streamed: one tensor in
    memory at a time, whatever the size (a 7B model needs ~13.5 GB of disk and a few hundred MB of memory).
    Resumable: shards already written are kept."""
    folder = cache / size
    if (folder / "done").is_file():
        return folder
    from qbara.models.tiny import tiny_llama

    folder.mkdir(parents=True, exist_ok=True)
    config, plan = _tensor_plan(size)
    shards = _shards(plan)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, tensors in tqdm(list(zip(names, shards)), desc=f"writing {size}", file=sys.stderr):
        if not (folder / name).is_file():
            _write_shard(folder / name, tensors)
    index = {"metadata": {"total_size": sum(2 * math.prod(shape) for _, shape in plan)},
             "weight_map": {key: name for name, tensors in zip(names, shards) for key, _ in tensors}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(folder)
    tiny_llama()[1].save_pretrained(folder)  # a small byte-level tokenizer: the benchmark feeds random ids
    (folder / "done").write_text("1")
    return folder


# ---------------------------------------------------------------- one case, in its own process

def run_case(case: str, folder: str, steps: int, trim: bool = False, heap_default: bool = False) -> dict:
    """One case in this process: load + prepare, then `steps` training steps, each step's peaks printed as it ends
    (a STEP line), the whole as a RESULT line. trim: hand freed heap pages back to the OS after each step.
    qbara's cases bound the heap's growth after loading as `qbara.train` does (`bound_heap_growth`), unless
    heap_default."""
    import torch
    import transformers  # noqa: F401  (imported before the baseline: the peak is the load's own)

    if case.startswith("qbara"):
        from qbara.memory import bound_heap_growth
    else:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    torch.manual_seed(0)
    baseline = PeakAnon.now()
    start = time.perf_counter()
    with PeakAnon() as load_peak:
        model = _load(case, folder)
    load_s = time.perf_counter() - start
    gc.collect()
    bounded = case.startswith("qbara") and not heap_default and bound_heap_growth()  # where qbara.train sets it
    result = {"case": case, "load_s": load_s, "load_peak_anon": load_peak.peak, "baseline_anon": baseline,
              "load_peak_rss": proc_status_bytes("VmHWM"), "after_load": proc_status(*_STATE), "trim": trim,
              "bound_heap": bounded, "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}
    print("LOAD " + json.dumps(result), flush=True)
    if steps:
        if case == "bnb-nf4":  # fp32 compute like qbara's: what prepare_model_for_kbit_training does
            for p in model.parameters():
                if p.dtype == torch.bfloat16:
                    p.data = p.data.float()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        ids = torch.randint(0, 32000, (1, 256), generator=torch.Generator().manual_seed(0))
        ends, stamps = [], [time.perf_counter()]

        def after_step():  # the state between steps: what a step leaves behind (Adam moments, cached buffers, heap)
            if trim:
                release_freed_memory()
            ends.append(proc_status(*_STATE))
            stamps.append(time.perf_counter())
            anon, rss = monitor.segments[-1]
            print("STEP " + json.dumps({"step": len(ends), "seconds": stamps[-1] - stamps[-2], "peak_anon": anon,
                                        "peak_rss": rss, "end": ends[-1]}), flush=True)

        with PeakAnon() as monitor:
            times, _ = timed_training_steps(model, ids, optimizer, steps, monitor, after_step, progress=True)
        result.update(step_s=statistics.median(times[1:] or times), steps=times, train_peak_anon=monitor.peak,
                      train_peak_rss=monitor.peak_rss, step_peaks=monitor.segments, step_ends=ends,
                      trainable=sum(p.numel() for p in params),
                      adam_state=sum(t.numel() * t.element_size() for st in optimizer.state.values()
                                     for t in st.values() if torch.is_tensor(t)))
    result["peak_rss"] = proc_status_bytes("VmHWM")
    return result


_STATE = ("VmRSS", "RssAnon", "RssFile")


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

class MemoryCgroup:
    """A memory cgroup a case runs in: cgroup v1 (/sys/fs/cgroup/memory/NAME) or v2 (/sys/fs/cgroup/NAME), its
    limit set; reports its peak charge (anonymous memory and the page cache it touched) and whether it hit the
    limit or OOM-killed."""

    def __init__(self, name: str, limit: int):
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        if Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").is_file():
            self.version, self.path = 1, Path("/sys/fs/cgroup/memory") / name
        elif v2.is_file() and "memory" in v2.read_text().split():
            self.version, self.path = 2, Path("/sys/fs/cgroup") / name
        else:
            raise SystemExit("--cgroup-limit: this machine has no cgroup v1 memory controller and no cgroup v2 one "
                             "(/sys/fs/cgroup); run without --cgroup-limit")
        try:
            self.path.mkdir(exist_ok=True)
            if self.version == 1:
                self._write("memory.limit_in_bytes", limit)
                self._write("memory.max_usage_in_bytes", 0)  # reset the peak and the failure count
                self._write("memory.failcnt", 0)
            else:
                self._write("memory.max", limit)
        except OSError as err:
            raise SystemExit(f"--cgroup-limit: cannot create or set {self.path} ({err}); run as root, or without "
                             f"--cgroup-limit") from None
        self.limit = limit

    def _write(self, name: str, value) -> None:
        (self.path / name).write_text(str(value))

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def enter(self) -> None:
        """Move the calling process into the group (the child's preexec_fn: everything it allocates is charged)."""
        self._write("cgroup.procs", os.getpid())

    def report(self) -> dict:
        if self.version == 1:
            oom = dict(line.split() for line in self._read("memory.oom_control").splitlines())
            return {"cgroup_limit": self.limit, "cgroup_peak": int(self._read("memory.max_usage_in_bytes")),
                    "cgroup_failcnt": int(self._read("memory.failcnt")), "oom_kill": int(oom.get("oom_kill", 0))}
        events = dict(line.split() for line in self._read("memory.events").splitlines())
        peak = self.path / "memory.peak"  # Linux >= 5.19
        return {"cgroup_limit": self.limit, "cgroup_peak": int(peak.read_text()) if peak.is_file() else None,
                "cgroup_failcnt": int(events.get("max", 0)), "oom_kill": int(events.get("oom_kill", 0))}

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def _bytes(text: str) -> int:
    """'16G', '512M', '1073741824' -> bytes (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)


def run_isolated(size: str, case: str, folder: Path, args, record: Path, log: Path) -> dict:
    """One case in a fresh process (in a memory cgroup with --cgroup-limit); its record rewritten after every
    line it reports, so an interrupted case shows how far it got."""
    group = MemoryCgroup(f"qbara-scale-{record.stem}", _bytes(args.cgroup_limit)) if args.cgroup_limit else None
    command = [sys.executable, __file__, "--steps", str(args.steps), "--case-json", f"{case}|{folder}"]
    command += ["--trim"] * args.trim + ["--heap-default"] * args.heap_default
    entry = {"case": case, "status": "running", "steps_done": [], "started": time.strftime("%Y-%m-%d %H:%M:%S"),
             "commit": _commit(), "command": " ".join(command[1:])}
    record.write_text(json.dumps(entry, indent=2))
    with open(log, "a") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True,
                                preexec_fn=group.enter if group else None,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
        for line in proc.stdout:
            err.write(line)
            err.flush()
            kind, _, payload = line.partition(" ")
            if kind == "LOAD":
                entry.update(json.loads(payload))
            elif kind == "STEP":
                entry["steps_done"].append(json.loads(payload))
            elif kind == "RESULT":
                entry.update(json.loads(payload), status="done")
            if group:
                entry.update(group.report())
            record.write_text(json.dumps(entry, indent=2))
        code = proc.wait()
    if group:
        entry.update(group.report())
        group.remove()
    if entry["status"] != "done" or code:
        tail = log.read_text().strip().splitlines()[-1:] or ["failed"]
        killed = code == -9 or (group and entry.get("oom_kill"))
        entry.update(status="oom-killed" if killed else "failed", returncode=code, error=tail)
    entry["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    record.write_text(json.dumps(entry, indent=2))
    return entry


def _commit() -> str | None:
    if os.environ.get("SCALE_COMMIT"):  # a run from an exported copy of the tree
        return os.environ["SCALE_COMMIT"]
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent)
    return proc.stdout.strip() or None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.1b,0.5b,1.1b", help=f"of {', '.join(SIZES)}")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--steps", type=int, default=5, help="training steps per case (0: load only)")
    parser.add_argument("--cgroup-limit", help="run each case in a memory cgroup of this size (e.g. 16G; Linux, "
                        "root: cgroup v1 or v2), reporting its peak and whether it OOMed")
    parser.add_argument("--trim", action="store_true", help="malloc_trim after each training step (glibc: hand "
                        "freed heap pages back), to tell heap growth from live memory")
    parser.add_argument("--heap-default", action="store_true", help="qbara's cases leave glibc's malloc as it is "
                        "(without qbara.memory.bound_heap_growth, which qbara.train applies)")
    parser.add_argument("--tag", default="", help="a name for this variant (e.g. trim), kept apart from the plain "
                        "cases in the records and tables")
    parser.add_argument("--rerun", action="store_true", help="run cases that already have a finished record")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/qbara/scale-models"))
    parser.add_argument("--out", default="bench/results/scale")
    parser.add_argument("--report-only", action="store_true", help="rewrite scale.json / .md / .png from the case "
                        "records in OUT/cases (also those of a run still going), running nothing")
    parser.add_argument("--case-json", help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    args = parser.parse_args(argv)
    if args.case_json:
        case, folder = args.case_json.split("|", 1)
        print("RESULT " + json.dumps(run_case(case, folder, args.steps, args.trim, args.heap_default)), flush=True)
        return {}
    out = Path(args.out)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    results = json.loads((out / "scale.json").read_text()) if (out / "scale.json").is_file() else {}
    if args.report_only:
        for record in sorted((out / "cases").glob("*.json")):
            size, name = record.stem.split("-", 1)
            case = max((c for c in CASES + LQ_CASES if name.startswith(c)), key=len)
            case += f" ({name[len(case) + 1:]})" if name != case else ""
            results.setdefault(size, {"params": parameter_count(size), "cases": {}})["cases"][case] = \
                json.loads(record.read_text())
        args.sizes = ""
    for size in filter(None, args.sizes.split(",")):
        folder = make_model(size, Path(args.cache))
        results[size] = {"params": parameter_count(size), "cases": dict(results.get(size, {}).get("cases", {}))}
        for case in args.cases.split(","):
            key = f"{case} ({args.tag})" if args.tag else case
            record = out / "cases" / f"{size}-{case}{'-' + args.tag if args.tag else ''}.json"
            done = json.loads(record.read_text()) if record.is_file() else {}
            if done.get("status") != "done" or args.rerun:
                log = out / "logs" / record.with_suffix(".log").name
                print(f"{size} {key}: running (log {log})", flush=True)
                done = run_isolated(size, case, folder, args, record, log)
            results[size]["cases"][key] = done
            print(f"{size} {case}: {_one_line(done)}", flush=True)
            (out / "scale.json").write_text(json.dumps(results, indent=2))
    report = summarize(results)
    (out / "scale.md").write_text(report)
    print(report)
    plot(results, out / "scale.png")
    return results


def _one_line(r: dict) -> str:
    if "load_s" not in r:
        return f"{r.get('status', 'failed')} {r.get('error', '')}"
    text = (f"{r.get('status', 'done')}: load {r['load_s']:.1f} s, peak anon {r['load_peak_anon'] / GiB:.2f} GiB, "
            f"peak RSS {r['load_peak_rss'] / GiB:.2f} GiB")
    steps = r.get("steps_done") or []
    if steps:
        text += ", steps " + " ".join(f"{s['peak_anon'] / GiB:.2f}" for s in steps) + " GiB peak anon"
    if "cgroup_peak" in r:
        text += f", cgroup peak {r['cgroup_peak'] / GiB:.2f} GiB, OOM kills {r['oom_kill']}"
    return text


def _ratio(a, b, key) -> str:
    return f"{a[key] / b[key]:.2f}×" if key in a and key in b and b[key] else "-"


def summarize(results: dict) -> str:
    lines = ["| model | case | load+prepare s | peak anon GiB (B/param) | peak RSS GiB | RSS after load GiB "
             "(file-backed) | step s | vs bnb-nf4 (LQ: vs qbara-lq-dense): anon / RSS / load / step |",
             "|---|---|---|---|---|---|---|---|"]
    per_param = {}
    for size, entry in results.items():
        n = entry["params"]
        bnb = entry["cases"].get("bnb-nf4", {})
        for case, r in entry["cases"].items():
            if "load_s" not in r:
                lines.append(f"| {size} | {case} | {r.get('status', 'failed')}: {r.get('error', '')} | | | | | |")
                continue
            anon = r["load_peak_anon"] - r["baseline_anon"]
            per_param.setdefault(case, []).append(anon / n)
            step = f"{r['step_s']:.2f}" if "step_s" in r else "-"
            after = r.get("after_load")
            after = f"{after['VmRSS'] / GiB:.2f} ({after['RssFile'] / GiB:.2f})" if after else "-"
            ref = entry["cases"].get("qbara-lq-dense", {}) if case.startswith("qbara-lq") else bnb
            vs = "-" if case in ("bnb-nf4", "qbara-lq-dense") or "load_s" not in ref else (
                f"{_ratio(r, ref, 'load_peak_anon')} / {_ratio(r, ref, 'load_peak_rss')} / "
                f"{_ratio(r, ref, 'load_s')} / {_ratio(r, ref, 'step_s')}")
            label = case if r.get("commit") else f"{case} (earlier run)"
            lines.append(f"| {size} ({n / 1e9:.2f}B) | {label} | {r['load_s']:.1f} | "
                         f"{anon / GiB:.2f} ({anon / n:.2f}) | "
                         f"{r['load_peak_rss'] / GiB:.2f} | {after} | {step} | {vs} |")
    lines += ["", "Peak anonymous memory of loading, above the process's own baseline (Python, torch, transformers),",
              "in bytes per parameter, extrapolated (largest measured size's B/param × parameters + baseline):", "",
              "| case | B/param | 7B | 13B | 70B |", "|---|---|---|---|---|"]
    for case, values in per_param.items():
        b = values[-1]
        lines.append(f"| {case} | {b:.2f} | {7e9 * b / GiB:.1f} GiB | {13e9 * b / GiB:.1f} GiB | "
                     f"{70e9 * b / GiB:.1f} GiB |")
    return "\n".join(lines + [""] + step_table(results)) + "\n"


def step_table(results: dict) -> list[str]:
    """Per training step: peak anonymous memory (GiB, and above the baseline in B/param), the growth of step 2
    over step 1, the anonymous memory left between steps, the adapter's Adam moments, the cgroup's peak."""
    lines = ["Per training step (runs with per-step records): peak anonymous memory of each step, GiB (step 1 above "
             "the baseline in B/param); anon left between steps (after step 1 → after the last); adapter parameters "
             "and their two fp32 Adam moments; the memory cgroup's peak charge (anon + page cache) and OOM kills. "
             "Seconds are wall time on the machine as it was: the cases run one after another, so their times compare "
             "only where the machine's load was the same.", "",
             "| model | case | status | step peak anon GiB (1, 2, …) | step 2 − step 1 GiB | anon after step 1 → last "
             "GiB | step s | adapter params (Adam MiB) | vs bnb-nf4: step 1 / max peak | cgroup peak GiB, OOM |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for size, entry in results.items():
        n = entry["params"]
        for case, r in entry["cases"].items():
            steps = r.get("steps_done")
            if not steps:
                continue
            peaks = [s["peak_anon"] for s in steps]
            first = f"{peaks[0] / GiB:.2f} ({(peaks[0] - r['baseline_anon']) / n:.2f} B/p)"
            rest = ", ".join(f"{p / GiB:.2f}" for p in peaks[1:])
            growth = f"{(peaks[1] - peaks[0]) / GiB:+.2f}" if len(peaks) > 1 else "-"
            ends = f"{steps[0]['end']['RssAnon'] / GiB:.2f} → {steps[-1]['end']['RssAnon'] / GiB:.2f}"
            seconds = ", ".join(f"{s['seconds']:.0f}" for s in steps)
            adam = f"{r['trainable'] / 1e6:.1f} M ({r['adam_state'] / 2 ** 20:.0f})" if "trainable" in r else "-"
            bnb = (entry["cases"].get("bnb-nf4") or {}).get("steps_done")
            vs = "-" if case == "bnb-nf4" or not bnb else (
                f"{peaks[0] / bnb[0]['peak_anon']:.2f}× / {max(peaks) / max(s['peak_anon'] for s in bnb):.2f}×")
            group = (f"{r['cgroup_peak'] / GiB:.2f} of {r['cgroup_limit'] / GiB:.0f}, {r['oom_kill']}"
                     if r.get("cgroup_peak") else "-")
            status = r.get("status", "done")
            if status != "done":  # a record still "running" is a run going on or one stopped: its steps so far
                status = f"incomplete: {len(steps)} steps recorded"
            lines.append(f"| {size} | {case} | {status} | {first}, {rest} | "
                         f"{growth} | {ends} | {seconds} | {adam} | {vs} | {group} |")
    return lines


def plot(results: dict, path: Path) -> None:
    from qbara.plotting import pyplot, save_figure

    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4))
    color = {case: f"C{i}" for i, case in enumerate(CASES + LQ_CASES)}
    for case in CASES + LQ_CASES:
        xs, anon, load = [], [], []
        for size, entry in results.items():
            r = entry["cases"].get(case)
            if r and "load_s" in r:
                xs.append(entry["params"] / 1e9)
                anon.append((r["load_peak_anon"] - r["baseline_anon"]) / GiB)
                load.append(r["load_s"])
        if xs:
            axes[0].plot(xs, anon, "o-", label=case, color=color[case])
            axes[1].plot(xs, load, "o-", label=case, color=color[case])
    for size, entry in results.items():
        for case, r in entry["cases"].items():
            steps = r.get("steps_done")
            if steps:
                axes[2].plot(range(1, len(steps) + 1), [s["peak_anon"] / GiB for s in steps], "o-",
                             label=f"{size} {case}", color=color.get(case.split(" ")[0]))
    axes[0].set(xlabel="parameters (B)", ylabel="peak anonymous memory of loading (GiB)")
    axes[1].set(xlabel="parameters (B)", ylabel="load + prepare (s)")
    axes[2].set(xlabel="training step", ylabel="peak anonymous memory of the step (GiB)", ylim=(0, None))
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
