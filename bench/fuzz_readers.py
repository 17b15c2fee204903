"""A property/fuzz pass over every reader qbara has (issue #26): seeded mutations of valid files, each loaded by
the public reader in a subprocess worker under a wall-clock timeout and a memory limit, every outcome classified.

    nice -n 10 python bench/fuzz_readers.py --cases 150 --seed 0 --out bench/results/fuzz
    python bench/fuzz_readers.py --readers adapter,gguf --cases 20      # a group name expands (adapter-*)
    python bench/fuzz_readers.py --replay gguf:17 --seed 0              # one case again, in-process, traceback shown

Seeds (tiny random models, built fresh per run under OUT/seeds): an HF folder, an adapter folder per method
(lora, qalora, qbara, qahira on an INT4 block-32 base, random adapter weights), a native quantized folder, a
GGUF file, a run YAML, JSONL/JSON/CSV/TXT data files, a saved HF dataset and a JSONL file read as `dataset:`.
Each case copies one seed, applies one seeded mutation to one of its files (byte-level, structure-aware or
filesystem) and asks a worker to read it. Outcomes:

    clean-error  a QbaraError with a one-line message
    ok-equal     loaded, and the result (logits and token ids on a fixed input / run config / examples / the CLI's
                 JSON) is exactly the seed's: the mutation did not change the meaning
    ok-changed   loaded, but the result differs from the seed's: a SILENT CHANGE, to be examined
    traceback    any other exception (or a multi-line QbaraError)
    hang         the worker ran past --timeout and was killed
    crash        the worker died by a signal / exited, or MemoryError / an allocator failure under the limit

Writes OUT/summary.json (counts, signatures, every case) and OUT/summary.md (the reader x outcome table and
the distinct failure signatures with one reproducer each). Deterministic for a seed: case i of a reader
depends only on (seed, reader, i).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import random
import re
import resource
import select
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve()
OUTCOMES = ("clean-error", "ok-equal", "ok-changed", "traceback", "hang", "crash")
FAILURES = ("traceback", "hang", "crash")
METHODS = ("lora", "qalora", "qbara", "qahira")
PROBE_TEXT = "Hello, world! 123 \u00e9"
MAX_LENGTH = 512
TEXT_LENGTH = 64
DEEP = 100_000

# reader -> its targets (one seed each); a case picks one target of its reader
READERS = {
    **{f"adapter-{m}": (f"adapter-{m}",) for m in METHODS},
    "native": ("native",),
    "hf": ("hf",),
    "gguf": ("gguf",),
    "yaml": ("yaml",),
    "data-jsonl": ("data-jsonl",),
    "data-json": ("data-json",),
    "data-csv": ("data-csv",),
    "data-txt": ("data-txt",),
    "dataset": ("dataset-saved", "dataset-jsonl"),
    "cli": ("cli-native", "cli-gguf", "cli-adapter", "cli-data"),
}
GROUPS = {"adapter": [f"adapter-{m}" for m in METHODS], "data": ["data-jsonl", "data-json", "data-csv", "data-txt"]}

# target -> (seed file or folder under OUT/seeds, how it is read)
TARGETS = {
    **{f"adapter-{m}": (f"adapter-{m}", "adapter") for m in METHODS},
    "native": ("native", "model"),
    "hf": ("hf", "model"),
    "gguf": ("tiny.gguf", "model"),
    "yaml": ("run.yaml", "yaml"),
    "data-jsonl": ("data.jsonl", "data"),
    "data-json": ("data.json", "data"),
    "data-csv": ("data.csv", "data"),
    "data-txt": ("data.txt", "data"),
    "dataset-saved": ("dataset_saved", "dataset"),
    "dataset-jsonl": ("ds.jsonl", "dataset"),
    "cli-native": ("native", "cli"),
    "cli-gguf": ("tiny.gguf", "cli"),
    "cli-adapter": ("adapter-lora", "cli"),
    "cli-data": ("data.jsonl", "cli"),
}
CLI_ARGV = {
    "cli-native": ["eval", "--model", "{path}", "--max-tokens", "8", "--json"],
    "cli-gguf": ["eval", "--model", "{path}", "--max-tokens", "8", "--json"],
    "cli-adapter": ["eval", "--model", "tiny-llama", "--adapter", "{path}", "--max-tokens", "8", "--json"],
    "cli-data": ["eval", "--model", "tiny-llama", "--task", "loss", "--data", "{path}", "--window", "512", "--json"],
}

# Targets whose files are the user's own or carry no integrity record: a silent change there can be legitimate.
# The others (adapter folders, the native quantized folder) record digests: a silent change there is a bug.
CHANGE_EXPECTED = {"hf", "gguf", "yaml", "data-jsonl", "data-json", "data-csv", "data-txt", "dataset-saved",
                   "dataset-jsonl", "cli-gguf", "cli-data"}

# Why a silent change can be legitimate, per reader (shown next to the ok-changed counts).
CHANGE_NOTES = {
    "hf": "an HF folder records no digest: changed weight bytes or tokenizer entries load as written",
    "gguf": "a GGUF file records no digest: changed tensor bytes or metadata values load as written",
    "yaml": "a run config is the user's own text: a changed value is a changed setting (duplicate keys: the "
            "last silently wins)",
    "data-jsonl": "a data file is the user's own text: a changed record is a changed example",
    "data-json": "a data file is the user's own text: a changed record is a changed example",
    "data-csv": "a data file is the user's own text: a changed cell is a changed example",
    "data-txt": "a text file is the user's own text: any changed byte changes the packed examples",
    "dataset": "the user's own data: a changed record is a changed example",
    "cli": "same as the reader under the command (the data file / GGUF are the user's; the native folder and "
           "adapter record digests and should never change silently)",
}

# ---------------------------------------------------------------- seeds (need torch and qbara)


def build_seeds(root: Path) -> Path:
    """Write every seed under `root` and the reference result of each target to root/refs.pt."""
    import torch

    from qbara import AdapterConfig, QuantConfig, prepare, save_adapter
    from qbara.export import export_gguf
    from qbara.models import tiny_llama
    from qbara.native import save_quantized

    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    quant = QuantConfig("int4", block_size=32)
    model, tok = tiny_llama()
    model.save_pretrained(root / "hf", safe_serialization=True)
    tok.save_pretrained(root / "hf")
    for method in METHODS:
        model, _ = tiny_llama()
        prepare(model, quant, AdapterConfig(method, rank=4, alpha=8))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, param in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        save_adapter(model, root / f"adapter-{method}", base_model_name="tiny-llama")
    model, tok = tiny_llama()
    prepare(model, quant)
    save_quantized(model, tok, root / "native")
    model, tok = tiny_llama()
    prepare(model, quant)
    export_gguf(model, tok, root / "tiny.gguf")
    _write_data(root)
    (root / "run.yaml").write_text(_run_yaml(root))
    refs = {target: read_target(target, str(root / TARGETS[target][0])) for target in TARGETS}
    torch.save(refs, root / "refs.pt")
    return root


INSTRUCTIONS = [{"instruction": "Say hi.", "output": "hi"},
                {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
                {"instruction": "Name a colour.", "output": "blue"}]
CHATS = [{"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."}]},
         {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                       {"role": "assistant", "content": "4"}]}]
TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
        "arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them. To die, "
        "to sleep, no more; and by a sleep to say we end the heart-ache and the thousand natural shocks.\n")


def _write_data(root: Path) -> None:
    import datasets

    jsonl = "".join(json.dumps(r) + "\n" for r in INSTRUCTIONS)
    (root / "data.jsonl").write_text(jsonl)
    (root / "ds.jsonl").write_text(jsonl)
    (root / "data.json").write_text(json.dumps(CHATS, indent=1))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["instruction", "input", "output"])
    writer.writeheader()
    writer.writerows({"input": "", **r} for r in INSTRUCTIONS)
    (root / "data.csv").write_text(buffer.getvalue())
    (root / "data.txt").write_text(TEXT)
    datasets.Dataset.from_list([{"input": "", **r} for r in INSTRUCTIONS]).save_to_disk(str(root / "dataset_saved"))


def _run_yaml(root: Path) -> str:
    import yaml

    return yaml.safe_dump({
        "model": {"name": "tiny-llama"}, "quant": {"format": "int4", "block_size": 32},
        "adapter": {"method": "lora", "rank": 4, "alpha": 8},
        "data": {"train": str(root / "data.jsonl"), "max_length": 64, "on_error": "fail"},
        "train": {"output_dir": str(root / "run-out"), "steps": 3, "batch_size": 1, "lr": 0.0002, "seed": 0,
                  "progress": False}}, sort_keys=False)


# ---------------------------------------------------------------- readers (what a worker runs)

_CACHE: dict = {}


def _tokenizer():
    if "tok" not in _CACHE:
        from qbara.models import tiny_llama

        _CACHE["tok"] = tiny_llama()[1]
    return _CACHE["tok"]


def _probe(model, tokenizer) -> dict:
    import torch

    ids = (torch.arange(1, 17) % model.config.vocab_size)[None]
    with torch.no_grad():
        logits = model(ids).logits.float()
    tokens = tokenizer(PROBE_TEXT, add_special_tokens=False).input_ids if tokenizer is not None else "no tokenizer"
    return {"logits": logits, "tokens": tokens}


def _read_model(path: str) -> dict:
    from qbara.models import load_model

    model, tokenizer = load_model(path)
    return _probe(model.eval(), tokenizer)


def _read_adapter(path: str) -> dict:
    from qbara import QuantConfig, load_adapter
    from qbara.models import load_model

    model, tokenizer = load_model("tiny-llama", quant=QuantConfig("int4", block_size=32))
    load_adapter(model, path)
    return _probe(model.eval(), tokenizer)


def _read_yaml(path: str) -> dict:
    from qbara.train.config import load_run_config

    return load_run_config(path).to_dict()


def _examples(records: list) -> list:
    from qbara.train.data import build_examples, detect_format

    fmt = detect_format(records)  # packed text in short sequences, records whole (Alpaca's prompt is long)
    length = TEXT_LENGTH if fmt == "text" else MAX_LENGTH
    return [(e.input_ids, e.labels) for e in build_examples(records, _tokenizer(), fmt, length, "fail")]


def _read_data(path: str) -> list:
    from qbara.train.data import read_records

    return _examples(read_records(path))


def _read_dataset(path: str) -> list:
    from qbara.train.data import read_records

    cache = os.environ.get("HF_DATASETS_CACHE")
    try:
        return _examples(read_records("dataset:" + path))
    finally:  # a fresh cache per case: a mutated file must never be answered from an earlier case's cache
        if cache and Path(cache).exists():
            shutil.rmtree(cache, ignore_errors=True)


PROGRESS = re.compile(r"\d+%\||\d+it \[|it/s\]")  # tqdm lines on stderr are not part of an error


class CliError(Exception):
    """The CLI exited non-zero with something other than one `qbara ...: error:` line."""


def _read_cli(target: str, path: str) -> dict:
    import contextlib

    from qbara.cli import main

    argv = [a.replace("{path}", path) for a in CLI_ARGV[target]]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exit_:  # argparse: not a reader's answer
            raise CliError(f"SystemExit {exit_.code}") from None
    text = "\n".join(line for line in err.getvalue().splitlines() if line.strip() and not PROGRESS.search(line))
    if rc == 2 and len(text.splitlines()) == 1 and "Traceback" not in text:
        from qbara.errors import QbaraError

        raise QbaraError(text)
    if rc != 0:
        raise CliError(f"exit {rc}: {' | '.join(text.splitlines()[-3:])}")
    result = json.loads(out.getvalue())
    return {k: v for k, v in result.items() if k not in ("model", "adapter")}


def read_target(target: str, path: str):
    """The result of reading `path` as `target` (what is compared with the seed's)."""
    how = TARGETS[target][1] if target in TARGETS else target
    if how == "model":
        return _read_model(path)
    if how == "adapter":
        return _read_adapter(path)
    if how == "yaml":
        return _read_yaml(path)
    if how == "data":
        return _read_data(path)
    if how == "dataset":
        return _read_dataset(path)
    if how == "cli":
        return _read_cli(target, path)
    return _selftest(target)


def _selftest(target: str):
    """Targets that check the harness itself: a plain exception, a hang, a hard crash, memory exhaustion."""
    if target == "selftest-raise":
        raise ValueError("a deliberately raised non-QbaraError")
    if target == "selftest-hang":
        time.sleep(3600)
    if target == "selftest-crash":
        os.abort()
    if target == "selftest-memory":
        return bytearray(64 << 30)
    if target == "selftest-ok":
        return {"value": 1}
    raise KeyError(target)


def difference(a, b) -> str | None:
    """None when `a` and `b` are the same result, else a short description of the first difference."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
            return f"tensor shape {getattr(a, 'shape', None)} vs {getattr(b, 'shape', None)}"
        if torch.equal(a, b):
            return None
        delta = (a.double() - b.double()).abs()
        return "logits differ (max |d| = %.3g%s)" % (delta.nan_to_num(0.0).max().item(),
                                                     ", non-finite" if not torch.isfinite(a).all() else "")
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"key {key!r} only on one side"
            diff = difference(a[key], b[key])
            if diff:
                return f"{key}: {diff}"
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{len(a)} items vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            diff = difference(x, y)
            if diff:
                return f"[{i}] {diff}"
        return None
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None
    return None if a == b and type(a) is type(b) else f"{_short(a)} vs {_short(b)}"


def _short(value, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _location(err: BaseException) -> str:
    """The innermost qbara frame, then the frame that raised when that is outside qbara."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return "?"
    here = [f for f in frames if "/qbara/" in f.filename]
    last = frames[-1]

    def name(frame):
        path = frame.filename
        cut = path.rfind("/qbara/")
        return (path[cut + 1:] if cut >= 0 else Path(path).name) + f":{frame.lineno} {frame.name}"

    if here and here[-1] is last:
        return name(last)
    if here:
        return f"{name(here[-1])} -> {Path(last.filename).name}:{last.name}"
    return f"{Path(last.filename).name}:{last.lineno} {last.name}"


# an allocation refused under RLIMIT_AS (torch, numpy, a C extension that returns NULL without an exception)
MEMORY_MESSAGES = ("can't allocate memory", "cannot allocate memory", "bad_alloc", "out of memory",
                   "failed to allocate", "error return without exception set")


def classify(target: str, path: str, reference) -> dict:
    """Read `path` as `target` and classify the outcome against the seed's `reference` result."""
    from qbara.errors import QbaraError

    try:
        result = read_target(target, path)
    except QbaraError as err:
        message = str(err).strip()
        if "\n" in message:
            return {"outcome": "traceback", "type": "QbaraError(multi-line)", "location": _location(err),
                    "message": message.splitlines()[0][:300]}
        return {"outcome": "clean-error", "message": message[:300]}
    except MemoryError as err:
        return {"outcome": "crash", "type": "MemoryError", "location": _location(err), "message": str(err)[:300]}
    except Exception as err:  # noqa: BLE001 - classifying every other exception is the point
        first = (str(err).strip().splitlines() or [""])[0][:300]
        outcome = "crash" if any(m in first.lower() for m in MEMORY_MESSAGES) else "traceback"
        return {"outcome": outcome, "type": type(err).__name__, "location": _location(err), "message": first}
    diff = difference(result, reference)
    return {"outcome": "ok-equal"} if diff is None else {"outcome": "ok-changed", "message": diff[:300]}


# ---------------------------------------------------------------- the worker process


def worker_main(seeds: Path, mem_gib: float) -> None:
    """Read one JSON job per line on stdin, answer one JSON line per job on the original stdout."""
    if mem_gib > 0:
        limit = int(mem_gib * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    channel = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # whatever a library prints must not mix with the answers
    import warnings

    warnings.simplefilter("ignore")
    refs = None
    channel.write("ready\n")
    channel.flush()
    for line in sys.stdin:
        job = json.loads(line)
        if refs is None and job["target"] in TARGETS:
            import torch

            torch.set_num_threads(1)
            refs = torch.load(seeds / "refs.pt", weights_only=False)
        reference = refs.get(job["target"]) if refs is not None else None
        start = time.monotonic()
        try:
            answer = classify(job["target"], job["path"], reference)
        except MemoryError:  # raised while handling the reader's own exception: the limit, not the reader
            answer = {"outcome": "crash", "type": "MemoryError", "location": "while classifying",
                      "message": "out of memory under the limit"}
        answer.update(id=job["id"], seconds=round(time.monotonic() - start, 3))
        channel.write(json.dumps(answer) + "\n")
        channel.flush()


class Worker:
    """One worker subprocess; `send` a job, `poll` its answer, `kill` it on a timeout."""

    def __init__(self, seeds: Path, mem_gib: float, log: Path, env: dict):
        self.proc = subprocess.Popen([sys.executable, str(HERE), "--worker", "--seeds", str(seeds), "--mem-gib",
                                      str(mem_gib)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(log, "ab"), env=env, start_new_session=True)
        self.buffer = b""
        self.ready = False
        self.job = None
        self.deadline = time.monotonic() + 300  # imports
        self.served = 0
        self.warm = False  # has imported qbara (answered a real target)

    def fileno(self):
        return self.proc.stdout.fileno()

    def send(self, job: dict, timeout: float) -> None:
        self.job = job
        self.deadline = time.monotonic() + timeout
        try:
            self.proc.stdin.write((json.dumps(job) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:  # it died: the end of its output says how
            pass

    def read_lines(self) -> list[str] | None:
        """Complete lines available now; None at EOF (the process ended)."""
        chunk = os.read(self.fileno(), 1 << 16)
        if not chunk:
            return None
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [line.decode() for line in lines]

    def died(self) -> str:
        rc = self.proc.wait()
        self._close_pipes()
        if rc < 0:
            return f"killed by {signal.Signals(-rc).name}"
        return f"exit {rc}"

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
            self._close_pipes()
        except (OSError, subprocess.TimeoutExpired):
            self.kill()


def worker_env(out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
           "HF_DATASETS_CACHE": str(out / "work" / "hf-datasets-cache"), "PYTHONWARNINGS": "ignore",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    src = HERE.parents[1] / "src"
    if "PYTHONPATH" not in os.environ and src.is_dir():
        env["PYTHONPATH"] = str(src)
    return env


IMPORT_ALLOWANCE = 120.0


def run_jobs(jobs, seeds: Path, out: Path, workers: int = 1, timeout: float = 60.0, mem_gib: float = 4.0,
             progress=None, recycle: int = 400):
    """Run jobs (an iterator of (job, cleanup) pairs) on a pool of workers; yield (job, answer) as they come."""
    env = worker_env(out)
    logs = out / "logs"  # each worker's stderr (kept: a crash's last words)
    logs.mkdir(parents=True, exist_ok=True)
    pool = [Worker(seeds, mem_gib, logs / f"worker-{i}.log", env) for i in range(workers)]
    jobs = iter(jobs)
    cleanups: dict = {}
    pending = True
    try:
        while True:
            for i, worker in enumerate(pool):  # hand out work
                if worker.ready and worker.job is None and pending:
                    nxt = next(jobs, None)
                    if nxt is None:
                        pending = False
                        continue
                    job, cleanup = nxt
                    cleanups[job["id"]] = cleanup
                    # a fresh worker imports torch and qbara on its first job: that is not the reader's time
                    allowance = IMPORT_ALLOWANCE if job["target"] in TARGETS and not worker.warm else 0
                    worker.send(job, job.get("timeout", timeout) + allowance)
            busy = [w for w in pool if w.job is not None or not w.ready]
            if not pending and not any(w.job is not None for w in pool):
                return
            ready, _, _ = select.select(busy, [], [], 0.5)
            now = time.monotonic()
            for i, worker in enumerate(pool):
                answer = None
                if worker in ready:
                    lines = worker.read_lines()
                    if lines is None:  # the worker died
                        why = worker.died()
                        if worker.job is None:
                            raise RuntimeError(f"worker {i} died while starting ({why}); see {logs}/worker-{i}.log")
                        answer = {"outcome": "crash", "type": why, "location": "worker process", "message": why}
                    for line in lines or []:
                        if line == "ready":
                            worker.ready = True
                        else:
                            answer = json.loads(line)
                elif now > worker.deadline:
                    worker.kill()
                    if worker.job is None:
                        raise RuntimeError(f"worker {i} did not start in time; see {logs}/worker-{i}.log")
                    answer = {"outcome": "hang", "type": "timeout", "location": f"over {timeout:g} s",
                              "message": f"no answer within {timeout:g} s"}
                if answer is None:
                    continue
                job = worker.job
                answer["id"] = job["id"]
                worker.job = None
                worker.served += 1
                worker.warm = worker.warm or job["target"] in TARGETS
                cleanups.pop(job["id"], lambda: None)()
                if progress is not None:
                    progress.update(1)
                if answer["outcome"] in ("hang", "crash") or worker.served >= recycle:
                    if answer["outcome"] not in ("hang", "crash"):
                        worker.close()
                    pool[i] = Worker(seeds, mem_gib, logs / f"worker-{i}.log", env)
                yield job, answer
    finally:
        for worker in pool:
            worker.kill()
        for cleanup in cleanups.values():
            cleanup()


# ---------------------------------------------------------------- mutations
# Each mutator takes (rng, path) and edits the file at `path` in place (or replaces it), returning a description.


def _bytes_flip(rng, path):
    data = bytearray(path.read_bytes())
    if not data:
        return "flip: empty file left as is"
    spots = []
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(min(len(data), 512)) if rng.random() < 0.5 else rng.randrange(len(data))
        bit = rng.randrange(8)
        data[at] ^= 1 << bit
        spots.append(f"{at}.{bit}")
    path.write_bytes(bytes(data))
    return f"flip bits {','.join(spots)}"


def _bytes_truncate(rng, path):
    data = path.read_bytes()
    keep = rng.randrange(len(data)) if data else 0
    path.write_bytes(data[:keep])
    return f"truncate to {keep} of {len(data)} bytes"


def _bytes_insert(rng, path):
    data = bytearray(path.read_bytes())
    at = rng.randrange(len(data) + 1)
    extra = rng.randbytes(rng.randint(1, 16))
    data[at:at] = extra
    path.write_bytes(bytes(data))
    return f"insert {len(extra)} random bytes at {at}"


def _bytes_delete(rng, path):
    data = bytearray(path.read_bytes())
    at = rng.randrange(max(len(data), 1))
    n = rng.randint(1, 64)
    del data[at:at + n]
    path.write_bytes(bytes(data))
    return f"delete {n} bytes at {at}"


def _bytes_zero(rng, path):
    data = bytearray(path.read_bytes())
    at = rng.randrange(max(len(data), 1))
    n = rng.choice([1, 8, 64, 4096])
    data[at:at + n] = bytes(len(data[at:at + n]))
    path.write_bytes(bytes(data))
    return f"zero {n} bytes at {at}"


def _bytes_random(rng, path):
    size = path.stat().st_size
    path.write_bytes(rng.randbytes(size))
    return f"replace with {size} random bytes"


BYTE_OPS = {"flip": _bytes_flip, "truncate": _bytes_truncate, "insert": _bytes_insert, "delete": _bytes_delete,
            "zero": _bytes_zero, "random": _bytes_random}


def _fs_replace(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _fs_op(kind: str):
    def mutate(rng, path: Path):
        _fs_replace(path)
        if kind.startswith("symlink:"):
            path.symlink_to(kind.split(":", 1)[1])
        elif kind == "symlink-folder":
            path.symlink_to(path.parent)
        elif kind == "symlink-dangling":
            path.symlink_to(path.parent / "does-not-exist")
        elif kind == "symlink-loop":
            path.symlink_to(path)
        elif kind == "folder":
            path.mkdir()
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "missing":
            pass
        return f"fs: {kind}"
    return mutate


FS_OPS = {k: _fs_op(k) for k in ("symlink:/dev/zero", "symlink:/dev/null", "symlink:/dev/urandom",
                                 "symlink-folder", "symlink-dangling", "symlink-loop", "folder", "fifo", "missing")}


# ---- JSON values (config / manifest / tokenizer files, safetensors headers, YAML documents)

SENTINEL = "\u0000QBARA-FUZZ\u0000"
RETYPES = ["x", "", 0, 1, 1.5, True, False, None, [], {}, [1], {"a": 1}]
SPECIALS = [float("nan"), float("inf"), float("-inf"), -1, 0, 2 ** 31, 2 ** 63, 2 ** 64 + 1, 10 ** 30, -2 ** 63,
            1e308, 1e-308, 0.5, -0.0]


def _paths(value, prefix=()):
    """Every path to a value inside a JSON document (not the root)."""
    out = []
    stack = [(value, prefix)]
    while stack:
        item, where = stack.pop()
        children = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        for key, child in children:
            out.append(where + (key,))
            stack.append((child, where + (key,)))
    out.sort(key=repr)
    return out


def _get(doc, path):
    for key in path:
        doc = doc[key]
    return doc


def _set(doc, path, value):
    _get(doc, path[:-1])[path[-1]] = value


def json_mutation(rng, doc):
    """(op, new document, raw replacement for the sentinel or None, description) for a parsed JSON document."""
    paths = _paths(doc)
    if not paths:
        return "replace-root", rng.choice(RETYPES), None, "the whole document replaced"
    for _ in range(20):  # an op that does not apply to the drawn value is drawn again
        op, new, raw, what = _json_edit(rng, doc, rng.choice(paths))
        if op != "reformat" or rng.random() < 0.15:
            return op, new, raw, what
    return op, new, raw, what


def _json_edit(rng, doc, path):
    old = _get(doc, path)
    parent = _get(doc, path[:-1])
    op = rng.choice(["retype", "special", "special", "huge-string", "remove", "duplicate-key", "deep", "add-key",
                     "int-as-string", "int-as-float", "off-by-one", "empty", "grow", "reformat", "reorder"])
    where = "/".join(str(k) for k in path)
    if op == "retype":
        new = rng.choice([v for v in RETYPES if type(v) is not type(old)])
        _set(doc, path, new)
        return op, doc, None, f"{where}: {_short(old, 30)} -> {_short(new)}"
    if op == "special":
        new = rng.choice(SPECIALS)
        _set(doc, path, new)
        return op, doc, None, f"{where}: {_short(old, 30)} -> {new!r}"
    if op == "huge-string":
        _set(doc, path, "A" * 1_000_000)
        return op, doc, None, f"{where}: a 1,000,000-character string"
    if op == "remove":
        del parent[path[-1]]
        return op, doc, None, f"{where}: removed"
    if op == "duplicate-key" and isinstance(parent, dict):
        twin = rng.choice([old, rng.choice(RETYPES + SPECIALS)])
        items = list(parent.items())
        at = [k for k, _ in items].index(path[-1])
        parent.clear()
        for k, v in items[: at + 1] + [(SENTINEL, twin)] + items[at + 1:]:
            parent[k] = v
        same = "same" if twin == old and type(twin) is type(old) else "other"
        return op, doc, ("key", path[-1]), f"{where}: key written twice, second value {_short(twin, 30)} ({same})"
    if op == "deep":
        _set(doc, path, SENTINEL)
        return op, doc, ("deep", DEEP), f"{where}: {DEEP:,} nested lists"
    if op == "add-key" and isinstance(parent, dict):
        parent["zz_fuzz_unknown"] = rng.choice(RETYPES)
        return op, doc, None, f"{'/'.join(str(k) for k in path[:-1]) or '<root>'}: unknown key added"
    if op == "int-as-string" and isinstance(old, (int, float)) and not isinstance(old, bool):
        _set(doc, path, str(old))
        return op, doc, None, f"{where}: {old!r} -> {str(old)!r}"
    if op == "int-as-float" and isinstance(old, int) and not isinstance(old, bool):
        _set(doc, path, float(old) + rng.choice([0.0, 0.5]))
        return op, doc, None, f"{where}: {old!r} -> {_get(doc, path)!r}"
    if op == "off-by-one" and isinstance(old, int) and not isinstance(old, bool):
        new = old + rng.choice([-1, 1])
        _set(doc, path, new)
        return op, doc, None, f"{where}: {old!r} -> {new!r}"
    if op == "empty" and isinstance(old, (dict, list, str)):
        _set(doc, path, type(old)())
        return op, doc, None, f"{where}: emptied"
    if op == "grow" and isinstance(old, list) and old:
        old.append(old[-1])
        return op, doc, None, f"{where}: last item duplicated"
    if op == "reorder" and isinstance(parent, dict):
        items = list(parent.items())
        rng.shuffle(items)
        parent.clear()
        parent.update(items)
        return op, doc, None, f"{'/'.join(str(k) for k in path[:-1]) or '<root>'}: keys reordered (same meaning)"
    return "reformat", doc, None, "re-serialised (same meaning)"


def dump_json(doc, raw, rng=None, indent=None) -> str:
    text = json.dumps(doc, indent=indent, ensure_ascii=True)
    if raw is None:
        return text
    kind, value = raw
    if kind == "deep":
        return text.replace(json.dumps(SENTINEL), "[" * value + "]" * value)
    return text.replace(json.dumps(SENTINEL), json.dumps(value))  # the duplicated key's name


def _json_struct(rng, path: Path):
    doc = json.loads(path.read_text())
    op, doc, raw, what = json_mutation(rng, doc)
    path.write_text(dump_json(doc, raw, indent=rng.choice([None, 1, 2])))
    return f"json {op}: {what}"


# ---- YAML run config


def _yaml_struct(rng, path: Path, op: str | None = None):
    import yaml

    text = path.read_text()
    op = op or rng.choice(["value", "value", "value", "alias-bomb", "alias", "python-tag", "merge-key", "multi-doc",
                     "tab-indent", "duplicate-section", "duplicate-key", "flow-style", "comments", "null-section",
                     "top-list", "scalar", "empty", "deep", "bom", "crlf"])
    if op == "value":
        doc = yaml.safe_load(text)
        sub, doc, raw, what = json_mutation(rng, doc)
        body = yaml.safe_dump(doc, sort_keys=False, width=10 ** 9)
        if raw is not None:
            kind, value = raw
            token = yaml.safe_dump(SENTINEL).strip().splitlines()[0]
            if token not in body:
                token = json.dumps(SENTINEL)
            body = body.replace(token, "[" * value + "]" * value if kind == "deep" else json.dumps(value))
        path.write_text(body)
        return f"yaml {sub}: {what}"
    edits = {
        "alias-bomb": lambda: "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh",
                                                                                               "bcdefghi"))
        + text,
        "alias": lambda: text.replace("steps: 3", "steps: &n 3").replace("batch_size: 1", "batch_size: *n"),
        "python-tag": lambda: text.replace("steps: 3", "steps: !!python/object/apply:os.getpid []"),
        "merge-key": lambda: "base: &b {steps: 9}\n" + text.replace("train:\n", "train:\n  <<: *b\n", 1),
        "multi-doc": lambda: text + "---\ntrain: {steps: 99}\n",
        "tab-indent": lambda: text.replace("  steps", "\tsteps"),
        "duplicate-section": lambda: text + "train:\n  steps: 7\n",
        "duplicate-key": lambda: text.replace("  steps: 3\n", "  steps: 3\n  steps: 5\n"),
        "flow-style": lambda: yaml.safe_dump(yaml.safe_load(text), default_flow_style=True, width=10 ** 9),
        "comments": lambda: "# a comment\n" + text.replace("\n", "  # trailing\n"),
        "null-section": lambda: text.replace("adapter:\n", "adapter:\nadapter_unused:\n"),
        "top-list": lambda: "- " + text.replace("\n", "\n  "),
        "scalar": lambda: "just a string\n",
        "empty": lambda: "",
        "deep": lambda: text + "extra: " + "[" * 5000 + "]" * 5000 + "\n",
        "bom": lambda: "\ufeff" + text,
        "crlf": lambda: text.replace("\n", "\r\n"),
    }
    path.write_text(edits[op](), newline="")
    return f"yaml {op}"


# ---- safetensors


def _st_parse(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def _st_write(path: Path, header, body: bytes, raw=None, length=None):
    text = dump_json(header, raw).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + body)


def _st_struct(rng, path: Path, op: str | None = None):
    data = path.read_bytes()
    n, header, body = _st_parse(data)
    names = sorted(k for k in header if k != "__metadata__")
    name = rng.choice(names)
    entry = header[name]
    op = op or rng.choice(["header-length", "offsets", "offsets", "dtype", "shape", "shape", "metadata", "rename",
                     "drop", "duplicate", "json", "swap-data"])
    if op == "header-length":
        new = rng.choice([0, 1, n - 1, n + 1, n + 8, len(data), len(data) + 1, 2 ** 32, 2 ** 63, 2 ** 64 - 1])
        path.write_bytes(struct.pack("<Q", new) + data[8:])
        return f"safetensors header-length {n} -> {new}"
    if op == "offsets":
        begin, end = entry["data_offsets"]
        size = len(body)
        new = rng.choice([[begin, end + 1], [begin, end - 1], [end, begin], [0, 0], [begin + 1, end + 1],
                          [begin, size + 1], [size, size + (end - begin)], [-1, end], [begin, 2 ** 64 - 1],
                          [0, end - begin], [begin, float(end)], [begin]])
        entry["data_offsets"] = new
        _st_write(path, header, body)
        return f"safetensors offsets {name}: {[begin, end]} -> {new}"
    if op == "dtype":
        new = rng.choice(["F16", "BF16", "F32", "F64", "I8", "U8", "I32", "I64", "BOOL", "F8_E4M3", "Q4", "", 5,
                          None])
        old, entry["dtype"] = entry["dtype"], new
        _st_write(path, header, body)
        return f"safetensors dtype {name}: {old} -> {new!r}"
    if op == "shape":
        shape = list(entry["shape"])
        choice = rng.choice(["plus", "minus", "zero", "huge", "negative", "add-dim", "drop-dim", "swap", "scalar",
                             "string"])
        i = rng.randrange(len(shape)) if shape else 0
        if shape and choice in ("plus", "minus", "zero", "huge", "negative"):
            shape[i] = {"plus": shape[i] + 1, "minus": shape[i] - 1, "zero": 0, "huge": 2 ** 40,
                        "negative": -shape[i]}[choice]
        elif choice == "add-dim":
            shape.append(1)
        elif choice == "drop-dim" and shape:
            shape.pop()
        elif choice == "swap":
            shape.reverse()
        elif choice == "scalar":
            shape = []
        elif choice == "string":
            shape = [str(s) for s in shape]
        old, entry["shape"] = entry["shape"], shape
        _st_write(path, header, body)
        return f"safetensors shape-{choice} {name}: {old} -> {shape}"
    if op == "metadata":
        meta = header.get("__metadata__")
        if meta and rng.random() < 0.6:
            key = rng.choice(sorted(meta))
            choice = rng.choice(["remove", "change", "retype"])
            if choice == "remove":
                del meta[key]
            elif choice == "change":
                meta[key] = (meta[key][:-1] + ("0" if meta[key][-1:] != "0" else "1")) if meta[key] else "x"
            else:
                meta[key] = rng.choice([1, None, [], {"a": "b"}])
            _st_write(path, header, body)
            return f"safetensors metadata-{choice} {key}"
        if meta is not None and rng.random() < 0.5:
            del header["__metadata__"]
            _st_write(path, header, body)
            return "safetensors metadata-removed"
        header["__metadata__"] = rng.choice([{"format": "pt", "zz": "1"}, [], "x", {"a": {"b": 1}}])
        _st_write(path, header, body)
        return f"safetensors metadata-set {header['__metadata__']!r}"
    if op == "rename":
        header[name + ".x"] = header.pop(name)
        _st_write(path, header, body)
        return f"safetensors rename {name} -> {name}.x"
    if op == "drop":
        del header[name]
        _st_write(path, header, body)
        return f"safetensors drop {name}"
    if op == "duplicate":
        other = rng.choice(names)
        header[SENTINEL] = dict(header[other])
        _st_write(path, header, body, raw=("key", name))
        return f"safetensors duplicate {name} written twice (second entry: {other}'s)"
    if op == "swap-data" and len(names) > 1:
        other = rng.choice([k for k in names if k != name])
        a, b = header[name], header[other]
        if a["dtype"] == b["dtype"] and a["shape"] == b["shape"]:
            a["data_offsets"], b["data_offsets"] = b["data_offsets"], a["data_offsets"]
            _st_write(path, header, body)
            return f"safetensors swap-data {name} and {other} point at each other's data (same shape)"
    sub, header, raw, what = json_mutation(rng, header)
    _st_write(path, header, body, raw=raw)
    return f"safetensors json-{sub} {what}"


# ---- GGUF


GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q",
                12: "<d"}


def gguf_fields(data: bytes) -> list[tuple[str, int, str, object]]:
    """(name, offset, struct format, value) of every header field of a GGUF file (up to the tensor data)."""
    fields = [("magic", 0, "<I", struct.unpack_from("<I", data, 0)[0])]
    pos = 4

    def take(name, fmt):
        nonlocal pos
        (value,) = struct.unpack_from(fmt, data, pos)
        fields.append((name, pos, fmt, value))
        pos += struct.calcsize(fmt)
        return value

    def string(name):
        nonlocal pos
        n = take(name + ".len", "<Q")
        text = data[pos:pos + n].decode("utf-8", "replace")
        pos += n
        return text

    def value(name, kind):
        nonlocal pos
        if kind == 8:
            return string(name)
        if kind == 9:
            inner = take(name + ".array_type", "<I")
            count = take(name + ".array_len", "<Q")
            for i in range(count):
                if inner == 8:
                    string(f"{name}[{i}]") if i < 3 else _skip_string()
                elif inner in GGUF_SCALARS:
                    if i < 3:
                        take(f"{name}[{i}]", GGUF_SCALARS[inner])
                    else:
                        pos += struct.calcsize(GGUF_SCALARS[inner])
            return None
        return take(name, GGUF_SCALARS[kind])

    def _skip_string():
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n

    take("version", "<I")
    n_tensors = take("n_tensors", "<Q")
    n_kv = take("n_kv", "<Q")
    for i in range(n_kv):
        key = string(f"kv[{i}].key")
        kind = take(f"kv[{key}].type", "<I")
        value(f"kv[{key}]", kind)
    for j in range(n_tensors):
        name = string(f"tensor[{j}].name")
        dims = take(f"tensor[{name}].n_dims", "<I")
        for d in range(dims):
            take(f"tensor[{name}].dim[{d}]", "<Q")
        take(f"tensor[{name}].type", "<I")
        take(f"tensor[{name}].offset", "<Q")
    return fields


def _gguf_value(rng, fmt: str, old):
    if fmt in ("<f", "<d"):
        return rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e30, old * 2 if isinstance(old, float) else 1.0])
    bits = struct.calcsize(fmt) * 8
    signed = fmt[-1].islower() and fmt[-1] != "?"
    top = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
    low = -(2 ** (bits - 1)) if signed else 0
    picks = [0, 1, old + 1, old - 1, old * 2, top, top // 2 + 1, 2 ** 31 - 1 if bits >= 32 else top, rng.randint(low,
                                                                                                            top)]
    if bits == 64:
        picks += [2 ** 32, 2 ** 40, 2 ** 60]
    if signed:
        picks += [-1, low]
    return max(low, min(top, rng.choice(picks)))


def _gguf_struct(rng, path: Path, op: str | None = None):
    """One header field forged; `op` names the field (e.g. n_tensors), else it is drawn."""
    data = bytearray(path.read_bytes())
    fields = gguf_fields(bytes(data))
    top = [f for f in fields if f[0] in ("version", "n_tensors", "n_kv")]
    tensors = [f for f in fields if f[0].startswith("tensor[")]
    kvs = [f for f in fields if f[0].startswith("kv[")]
    pool = rng.choice([top, tensors, tensors, kvs, kvs, [f for f in kvs if "len" in f[0]]]) or fields
    if op is not None:
        pool = [f for f in fields if f[0] == op]
    name, at, fmt, old = rng.choice(pool)
    new = old
    for _ in range(10):
        if new != old:
            break
        new = _gguf_value(rng, fmt, old)
    struct.pack_into(fmt, data, at, new)
    path.write_bytes(bytes(data))
    return f"gguf {name}: {old!r} -> {new!r}"


# ---- data records


LONG = 1_000_000
FIELD_VALUES = [123, 1.5, None, True, [], {}, ["a"], {"a": "b"}, "", "x" * LONG, "\ud800", "a\u0000b",
                float("nan"), SENTINEL]


def record_mutation(rng, records: list) -> tuple[list, object, str]:
    """(records, raw sentinel replacement, description) after one record-level edit."""
    op = rng.choice(["drop-field", "field-value", "field-value", "empty-record", "non-object", "no-records",
                     "extra-field", "duplicate-record", "reorder-keys", "messages", "deep-record"])
    if not records:
        return [{}], None, "empty-record (the list was empty)"
    i = rng.randrange(len(records))
    record = records[i]
    keys = sorted(record) if isinstance(record, dict) else []
    if op == "drop-field" and keys:
        key = rng.choice(keys)
        del record[key]
        return records, None, f"drop-field record {i + 1}: {key!r}"
    if op == "field-value" and keys:
        key = rng.choice(keys)
        value = rng.choice(FIELD_VALUES)
        record[key] = value
        raw = ("number", int("1" + "0" * 400)) if value == SENTINEL else None
        shown = _short(value, 30) if value != SENTINEL else "1e400 (int)"
        return records, raw, f"field-value record {i + 1}: {key} = {shown}"
    if op == "empty-record":
        records[i] = {}
        return records, None, f"empty-record record {i + 1}: {{}}"
    if op == "non-object":
        records[i] = rng.choice([None, 1, "text", [1, 2], []])
        return records, None, f"non-object record {i + 1}: {records[i]!r}"
    if op == "no-records":
        return [], None, "no-records"
    if op == "extra-field" and keys:
        record["zz_extra"] = "ignored?"
        return records, None, f"extra-field record {i + 1}: unknown field added"
    if op == "duplicate-record":
        records.insert(i, json.loads(json.dumps(record)))
        return records, None, f"duplicate-record record {i + 1}"
    if op == "reorder-keys" and keys:
        items = list(record.items())
        items.reverse()
        records[i] = dict(items)
        return records, None, f"reorder-keys record {i + 1}: keys reordered (same meaning)"
    if op == "messages" and isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
        choice = rng.choice(["no-role", "role", "content-type", "not-list", "no-assistant", "empty"])
        if choice == "no-role":
            del messages[0]["role"]
        elif choice == "role":
            messages[0]["role"] = rng.choice(["robot", "", 7])
        elif choice == "content-type":
            messages[-1]["content"] = rng.choice([None, 5, ["a"], {"t": "x"}])
        elif choice == "not-list":
            record["messages"] = "hello"
        elif choice == "no-assistant":
            record["messages"] = [m for m in messages if m.get("role") != "assistant"]
        else:
            record["messages"] = []
        return records, None, f"messages-{choice} record {i + 1}"
    if isinstance(record, dict) and keys:
        record[rng.choice(keys)] = SENTINEL
        return records, ("deep", DEEP), f"deep-field record {i + 1}: {DEEP:,} nested lists"
    records[i] = {}
    return records, None, f"empty-record record {i + 1}: {{}}"


def _dump_value(value, raw) -> str:
    text = json.dumps(value)
    if raw is None or json.dumps(SENTINEL) not in text:
        return text
    kind, n = raw
    return text.replace(json.dumps(SENTINEL), "[" * n + "]" * n if kind == "deep" else str(n))


def _jsonl_struct(rng, path: Path):
    lines = path.read_text().splitlines()
    if rng.random() < 0.25:
        op = rng.choice(["blank-lines", "crlf", "bom", "garbage-line", "array-line", "no-final-newline",
                         "whitespace-only"])
        edits = {"blank-lines": lambda: "\n\n".join(lines) + "\n\n", "crlf": lambda: "\r\n".join(lines) + "\r\n",
                 "bom": lambda: "\ufeff" + "\n".join(lines) + "\n",
                 "garbage-line": lambda: "\n".join(lines) + "\n{not json\n",
                 "array-line": lambda: "\n".join(lines) + "\n[1, 2]\n", "no-final-newline": lambda: "\n".join(lines),
                 "whitespace-only": lambda: "  \n\t\n"}
        path.write_text(edits[op](), newline="")
        return f"jsonl {op}"
    records = [json.loads(line) for line in lines if line.strip()]
    records, raw, what = record_mutation(rng, records)
    path.write_text("".join(_dump_value(r, raw) + "\n" for r in records))
    return f"records {what}"


def _json_records_struct(rng, path: Path):
    if rng.random() < 0.4:
        return _json_struct(rng, path)
    records = json.loads(path.read_text())
    records, raw, what = record_mutation(rng, records)
    path.write_text(_dump_value(records, raw))
    return f"records {what}"


def _csv_struct(rng, path: Path):
    text = path.read_text()
    rows = list(csv.reader(io.StringIO(text, newline="")))
    op = rng.choice(["drop-column", "rename-header", "extra-cell", "missing-cell", "empty-cell", "long-cell",
                     "nul-cell", "unterminated-quote", "duplicate-header", "header-only", "empty", "bom", "crlf-cell",
                     "semicolons", "newline-in-cell"])
    r = rng.randrange(1, len(rows))
    c = rng.randrange(len(rows[0]))
    if op == "drop-column":
        rows = [row[:c] + row[c + 1:] for row in rows]
    elif op == "rename-header":
        rows[0][c] = rows[0][c].upper()
    elif op == "extra-cell":
        rows[r].append("surplus")
    elif op == "missing-cell":
        rows[r].pop()
    elif op == "empty-cell":
        rows[r][c] = ""
    elif op == "long-cell":
        rows[r][c] = "y" * LONG
    elif op == "nul-cell":
        rows[r][c] += "\x00"
    elif op == "duplicate-header":
        rows[0][c] = rows[0][(c + 1) % len(rows[0])]
    elif op == "header-only":
        rows = rows[:1]
    elif op == "empty":
        rows = []
    elif op == "crlf-cell":
        rows[r][c] += "\r\n"
    elif op == "newline-in-cell":
        rows[r][c] += "\nsecond line"
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=";" if op == "semicolons" else ",")
    writer.writerows(rows)
    out = buffer.getvalue()
    if op == "unterminated-quote":
        out += '"open quote,' + "z" * 10
    if op == "bom":
        out = "\ufeff" + out
    path.write_text(out, newline="")
    return f"csv {op} (row {r}, column {c})"


def _txt_struct(rng, path: Path):
    text = path.read_text()
    op = rng.choice(["empty", "whitespace", "long", "nul", "bom", "crlf", "append", "one-char", "control",
                     "emoji", "invalid-utf8", "surrogate-utf8"])
    edits = {"empty": "", "whitespace": " \n\t\n", "long": text * 4000, "nul": text + "\x00",
             "bom": "\ufeff" + text, "crlf": text.replace("\n", "\r\n"), "append": text + "More words.\n",
             "one-char": "a", "control": text + "\x1b[31m\x07", "emoji": text + "\U0001F600" * 50}
    if op in edits:
        path.write_text(edits[op], newline="")
    else:
        path.write_bytes(text.encode() + (b"\xff\xfe" if op == "invalid-utf8" else b"\xed\xa0\x80"))
    return f"txt {op}"


def _arrow_struct(rng, path: Path):
    return _bytes_flip(rng, path)


STRUCT_OPS = {"safetensors": _st_struct, "gguf": _gguf_struct, "json": _json_struct, "yaml": _yaml_struct,
              "jsonl": _jsonl_struct, "records-json": _json_records_struct, "csv": _csv_struct, "txt": _txt_struct}


def file_kind(path: Path, target: str) -> str:
    suffix = path.suffix.lower()
    if suffix == ".json" and target in ("data-json",):
        return "records-json"
    return {".safetensors": "safetensors", ".gguf": "gguf", ".json": "json", ".yaml": "yaml", ".yml": "yaml",
            ".jsonl": "jsonl", ".csv": "csv", ".txt": "txt"}.get(suffix, "bytes")


def folder_extra(rng, folder: Path):
    """An unexpected extra file in a folder target."""
    choice = rng.choice(["pytorch_model.bin", "evil.py", "model-00002-of-00002.safetensors", "extra.safetensors",
                         "adapter_model.bin", "model.safetensors.index.json"])
    data = b"\x80\x04K\x01." if choice.endswith(".bin") else b"import os\n" if choice.endswith(".py") else \
        json.dumps({"metadata": {}, "weight_map": {"x": "missing.safetensors"}}).encode() \
        if choice.endswith(".json") else struct.pack("<Q", 2) + b"{}"
    (folder / choice).write_bytes(data)
    return f"extra file {choice}"


def make_case(seeds: Path, reader: str, index: int, seed: int, where: Path, family: str | None = None,
              op: str | None = None, file: str | None = None) -> dict:
    """Copy case `index` of `reader`'s seed into `where` and mutate it; returns the job (id, target, path, ...).

    family (byte, struct, fs, extra), op (a byte/fs op name, or a safetensors/YAML op or GGUF field name for
    struct) and file (the file's name) force the mutation (tests use them); otherwise all are drawn."""
    rng = random.Random(f"{seed}:{reader}:{index}")
    target = rng.choice(READERS[reader])
    source = seeds / TARGETS[target][0]
    where.mkdir(parents=True, exist_ok=True)
    copy = where / source.name
    (shutil.copytree if source.is_dir() else shutil.copy)(source, copy)
    files = sorted(p for p in copy.rglob("*") if p.is_file()) if copy.is_dir() else [copy]
    victim = rng.choices(files, [_weight(p) for p in files])[0] if file is None else \
        next(p for p in files if p.name == file)
    kind = file_kind(victim, target)
    family = family or rng.choices(["byte", "struct", "fs", "extra"],
                                   [0.35, 0.0 if kind == "bytes" else 0.5, 0.12, 0.03 if copy.is_dir() else 0])[0]
    if family == "extra":
        what = folder_extra(rng, copy)
        rel, op = ".", "extra-file"
    else:
        table = {"byte": BYTE_OPS, "fs": FS_OPS}.get(family)
        rel = victim.relative_to(copy).as_posix() if copy.is_dir() else victim.name
        if table is None:
            what = STRUCT_OPS[kind](rng, victim, op) if op else STRUCT_OPS[kind](rng, victim)
            op = re.sub(r"\[[^\]]*\]", "[]", " ".join(what.split()[:2])).rstrip(":")
        else:
            op = op or rng.choice(sorted(table))
            what = table[op](rng, victim)
    return {"id": f"{reader}:{index}", "reader": reader, "target": target, "path": str(copy), "file": rel,
            "family": family, "op": op, "mutation": f"{rel}: {what}"}


MAIN_FILES = ("qbara_adapter.json", "qbara_quant.json", "config.json", "adapter_config.json", "state.json")


def _weight(path: Path) -> float:
    """How often a file of a folder is the one mutated: weights and manifests more, qbara's output marker less."""
    if path.name == ".qbara-output.json":
        return 0.25
    return 3.0 if path.suffix in (".safetensors", ".gguf", ".arrow") or path.name in MAIN_FILES else 1.0


# ---------------------------------------------------------------- the run and its summary


def signature(case: dict) -> tuple:
    if case["outcome"] == "ok-changed":
        return case["reader"], "ok-changed", case["family"], f"{case['target']}/{case['file']}: {case['op']}"
    return case["reader"], case["outcome"], case.get("type", ""), case.get("location", "")


def summarize(cases: list[dict], meta: dict) -> dict:
    readers = list(dict.fromkeys(c["reader"] for c in cases))
    table = {r: {o: 0 for o in OUTCOMES} for r in readers}
    for case in cases:
        table[case["reader"]][case["outcome"]] += 1
    groups: dict = {}
    for case in cases:
        if case["outcome"] in FAILURES + ("ok-changed",):
            groups.setdefault(signature(case), []).append(case)
    signatures = []
    for key, members in groups.items():
        first = members[0]
        signatures.append({"reader": key[0], "outcome": key[1], "type": key[2], "location": key[3],
                           "count": len(members), "message": CASE_DIR.sub("", first.get("message", "")),
                           "case": first["id"],
                           "mutation": first["mutation"], "target": first["target"]})
    order = {o: i for i, o in enumerate(("crash", "hang", "traceback", "ok-changed"))}
    signatures.sort(key=lambda s: (order[s["outcome"]], s["reader"], -s["count"]))
    return {**meta, "table": table, "signatures": signatures, "cases": cases}


def markdown(summary: dict) -> str:
    lines = [f"# Reader fuzz pass: seed {summary['seed']}, {summary['cases_per_reader']} cases per reader", "",
             f"Command: `{summary['command']}`  ", f"Wall time: {summary['wall_s']:.0f} s on {summary['workers']} "
             f"worker(s), timeout {summary['timeout_s']:g} s, memory limit {summary['mem_gib']:g} GiB  ",
             f"qbara: {summary.get('qbara', '?')}", "",
             "| reader | " + " | ".join(OUTCOMES) + " | total |", "|---|" + "---:|" * (len(OUTCOMES) + 1)]
    totals = {o: 0 for o in OUTCOMES}
    for reader, row in summary["table"].items():
        lines.append(f"| {reader} | " + " | ".join(str(row[o]) for o in OUTCOMES) + f" | {sum(row.values())} |")
        for o in OUTCOMES:
            totals[o] += row[o]
    lines.append("| **all** | " + " | ".join(f"**{totals[o]}**" for o in OUTCOMES) + f" | **{sum(totals.values())}** |")
    if summary.get("harness_errors"):
        lines += ["", f"Harness errors (cases not run): {len(summary['harness_errors'])}: "
                  + "; ".join(summary["harness_errors"][:5])]
    failures = [s for s in summary["signatures"] if s["outcome"] in FAILURES]
    lines += ["", f"## Failure signatures ({len(failures)} distinct: reader, outcome, exception type, location)", ""]
    for i, s in enumerate(failures, 1):
        lines += [f"{i}. **{s['reader']} {s['outcome']}** `{s['type']}` at `{s['location']}` x{s['count']}  ",
                  f"   message: {s['message'][:200]}  ",
                  f"   reproducer: case `{s['case']}` ({s['target']}): {s['mutation'][:200]}  ",
                  f"   `python bench/fuzz_readers.py --replay {s['case']} --seed {summary['seed']}`"]
    changed = [s for s in summary["signatures"] if s["outcome"] == "ok-changed"]
    lines += ["", f"## Silent changes (ok-changed: {len(changed)} groups by reader, mutation family and kind)", ""]
    notes = {}
    for s in changed:
        note = CHANGE_NOTES.get(s["reader"]) or CHANGE_NOTES.get(s["reader"].split("-")[0]) or \
            "records a digest / checks sizes: a silent change here is a bug"
        notes.setdefault(s["reader"], note)
        flag = "" if s["target"] in CHANGE_EXPECTED else "**UNEXPECTED** "
        lines += [f"- {flag}**{s['reader']}** {s['type']} `{s['location']}` x{s['count']}: "
                  f"{s['message'][:120]}  ",
                  f"  e.g. case `{s['case']}`: {s['mutation'][:160]}"]
    if notes:
        lines += ["", "Why a change can be legitimate, per reader:", ""]
        lines += [f"- {reader}: {note}" for reader, note in notes.items()]
    return "\n".join(lines) + "\n"


def expand_readers(text: str | None) -> list[str]:
    if not text:
        return list(READERS)
    names = []
    for name in text.split(","):
        name = name.strip()
        names += GROUPS.get(name, [name])
    unknown = [n for n in names if n not in READERS]
    if unknown:
        raise SystemExit(f"unknown reader(s) {unknown}; choose from {', '.join(list(READERS) + list(GROUPS))}")
    return names


def build_seeds_in_subprocess(seeds: Path, out: Path) -> None:
    run = subprocess.run([sys.executable, str(HERE), "--build-seeds", str(seeds)], env=worker_env(out),
                         capture_output=True, text=True, timeout=900)
    if run.returncode != 0:
        raise SystemExit(f"building the seeds failed:\n{run.stderr[-3000:]}")


def run(args) -> dict:
    from tqdm import tqdm

    out = Path(args.out)
    seeds = out / "seeds"
    work = out / "work"
    for old in (work, out / "logs"):
        shutil.rmtree(old, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    work.mkdir(parents=True)
    start = time.monotonic()
    build_seeds_in_subprocess(seeds, out)
    readers = expand_readers(args.readers)

    harness_errors = []

    def jobs():
        for index in range(args.cases):
            for reader in readers:
                where = work / "cases" / f"{reader}-{index}"
                try:
                    job = make_case(seeds, reader, index, args.seed, where)
                except Exception as err:  # noqa: BLE001 - a mutator's own bug must not end the pass
                    harness_errors.append(f"{reader}:{index}: {type(err).__name__}: {err}")
                    continue
                yield job, (lambda w=where: shutil.rmtree(w, ignore_errors=True))

    total = args.cases * len(readers)  # less any harness error
    cases = {}
    with tqdm(total=total, desc="fuzz", unit="case", file=sys.stderr) as bar:
        raw = open(out / "logs" / "cases.jsonl", "w")  # every answer as it comes: the pass survives its summary
        for job, answer in run_jobs(jobs(), seeds, out, args.workers, args.timeout, args.mem_gib, bar):
            cases[job["id"]] = {**job, **answer}
            raw.write(json.dumps(cases[job["id"]]) + "\n")
            raw.flush()
            if answer["outcome"] in FAILURES:
                bar.set_postfix_str(f"{job['id']} {answer['outcome']}")
        raw.close()
    ordered = [cases[f"{r}:{i}"] for r in readers for i in range(args.cases) if f"{r}:{i}" in cases]
    meta = {"command": "python bench/fuzz_readers.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "seed": args.seed, "cases_per_reader": args.cases, "readers": readers, "workers": args.workers,
            "timeout_s": args.timeout, "mem_gib": args.mem_gib, "wall_s": round(time.monotonic() - start, 1),
            "qbara": _qbara_version(), "harness_errors": harness_errors}
    summary = summarize(ordered, meta)
    summary["cases"] = [compact(case) for case in ordered]
    write_summary(summary, out / "summary.json")
    (out / "summary.md").write_text(markdown(summary))
    shutil.rmtree(work, ignore_errors=True)
    return summary


CASE_FIELDS = ("id", "target", "family", "op", "mutation", "outcome", "type", "location", "message", "seconds")


def compact(case: dict) -> dict:
    """A case as summary.json keeps it: every field of a failure or silent change; of a clean error the op and
    the start of its message; of an unchanged load the op (--replay rebuilds any case in full)."""
    message = CASE_DIR.sub("", case.get("message", ""))
    if case["outcome"] in FAILURES + ("ok-changed",):
        kept = {k: case[k] for k in CASE_FIELDS if k in case}
        kept.update(reader=case["reader"], file=case["file"], mutation=case["mutation"][:160], message=message[:160])
        return kept
    kept = {"id": case["id"], "op": f"{case['file']}: {case['op']}", "outcome": case["outcome"]}
    if case["outcome"] == "clean-error":
        kept["message"] = message[:100]
    return kept


CASE_DIR = re.compile(r"[^\s'\"(]*/work/cases/[^/]+/")  # where a case's copy lived: the same for every case


def write_summary(summary: dict, path: Path) -> None:
    """summary.json: the counts and signatures indented, one line per case."""
    head = {k: v for k, v in summary.items() if k != "cases"}
    text = json.dumps(head, indent=1)[:-2] + ',\n "cases": [\n'
    text += ",\n".join("  " + json.dumps(case) for case in summary["cases"]) + "\n ]\n}\n"
    path.write_text(text)


def _qbara_version() -> str:
    try:
        head = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"commit {head}" + (" (src modified)" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def _replay_timeout(*_):
    raise TimeoutError("the case ran past --timeout (the pass counts it as a hang)")


def replay(args) -> None:
    """Rebuild one case and read it in this process, printing the outcome and the full traceback."""
    import torch

    out = Path(args.out)
    seeds = out / "seeds"
    if not (seeds / "refs.pt").exists():
        build_seeds(seeds)
    reader, index = args.replay.rsplit(":", 1)
    where = out / "replay" / f"{reader}-{index}"
    shutil.rmtree(where, ignore_errors=True)
    job = make_case(seeds, reader, int(index), args.seed, where)
    print(f"case {job['id']} ({job['target']}): {job['mutation']}\nfiles: {job['path']}")
    refs = torch.load(seeds / "refs.pt", weights_only=False)
    if args.mem_gib > 0:  # the worker's limits: the same memory limit, the timeout as an alarm
        limit = int(args.mem_gib * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGALRM, _replay_timeout)
    signal.alarm(int(args.timeout))
    try:
        result = read_target(job["target"], job["path"])
    except Exception:  # noqa: BLE001 - shown to the user
        traceback.print_exc()
        return
    finally:
        signal.alarm(0)
    print("loaded;", difference(result, refs[job["target"]]) or "equal to the seed's result")


def options(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100, help="cases per reader")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/fuzz")
    ap.add_argument("--readers", help=f"comma-separated: {', '.join(list(READERS) + list(GROUPS))} (default all)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--mem-gib", type=float, default=4.0, help="RLIMIT_AS of each worker")
    ap.add_argument("--replay", metavar="READER:INDEX", help="rebuild one case and read it in-process")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seeds", help=argparse.SUPPRESS)
    ap.add_argument("--build-seeds", metavar="DIR", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = options(argv)
    if args.worker:
        worker_main(Path(args.seeds), args.mem_gib)
    elif args.build_seeds:
        import warnings

        warnings.simplefilter("ignore")
        build_seeds(Path(args.build_seeds))
    elif args.replay:
        replay(args)
    else:
        summary = run(args)
        print(markdown(summary))


if __name__ == "__main__":
    main()
