"""Issue #14: every bad file, config and fault is one QbaraError (CLI: exit 2, one stderr line, no traceback);
no code runs from a model folder; damaged checkpoints are skipped on resume; random damage never loads."""
import json
import os
import pty
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from qbara import AdapterConfig, QuantConfig, prepare, save_adapter
from qbara.cli import main
from qbara.errors import QbaraError
from qbara.models import tiny_llama

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
QUANT = QuantConfig("int4", block_size=32)
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)


# ---------------------------------------------------------------- valid inputs, built once


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A tiny HF folder, an adapter folder for tiny-llama, a native quantized folder, a tiny GGUF, data."""
    from qbara.export import export_gguf
    root = tmp_path_factory.mktemp("good")
    model, tok = tiny_llama()
    model.save_pretrained(root / "hf", safe_serialization=True)
    tok.save_pretrained(root / "hf")
    model, tok = tiny_llama()
    prepare(model, QUANT, AdapterConfig("lora", rank=4, alpha=8))
    save_adapter(model, root / "adapter", base_model_name="tiny-llama")
    model, tok = tiny_llama()
    prepare(model, QUANT)
    from qbara.native import save_quantized

    save_quantized(model, tok, root / "quantized")
    model, tok = tiny_llama(**TINY)
    prepare(model, QUANT)
    export_gguf(model, tok, root / "tiny.gguf")
    (root / "data.jsonl").write_text(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    return root


def _copy(src: Path, dst: Path) -> Path:
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


def _edit_json(path: Path, edit):
    data = json.loads(path.read_text())
    result = edit(data)  # a string replaces the file; otherwise `data` was edited in place
    path.write_text(result if isinstance(result, str) else json.dumps(data))


def _yaml(tmp, good, text=None, **train):
    config = {"model": "tiny-llama", "quant": {"format": "int4", "block_size": 32},
              "adapter": {"method": "lora", "rank": 4}, "data": {"train": str(good / "data.jsonl")},
              "train": {"output_dir": str(tmp / "out"), "steps": 1, "batch_size": 1, "progress": False, **train}}
    path = tmp / "run.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(config))
    return path


# ---------------------------------------------------------------- the table: case -> (argv, api call)
# Each builder gets (tmp, good) and returns the CLI argv; the API call is the library function under it.


def _auto_map_folder(tmp, good, where="config.json"):
    folder = _copy(good / "hf", tmp / "custom")
    _edit_json(folder / where, lambda d: d.update(auto_map={"AutoConfig": "evil.Config"}))
    return folder


def _damaged_copy(source: Path, folder: Path, name: str, edit=None, raw=None) -> Path:
    """A copy of a good folder with one file replaced by raw bytes or its JSON edited."""
    folder = _copy(source, folder)
    if raw is not None:
        (folder / name).write_bytes(raw)
    elif edit is not None:
        _edit_json(folder / name, edit)
    return folder


def _adapter(tmp, good, edit=None, name="qbara_adapter.json", raw=None):
    return _damaged_copy(good / "adapter", tmp / "adapter", name, edit, raw)


def _quantized(tmp, good, edit=None, name="qbara_quant.json", raw=None):
    return _damaged_copy(good / "quantized", tmp / "q", name, edit, raw)


def _weights(folder: Path) -> Path:
    return folder / "adapter_model.safetensors"


def _truncate(path: Path, keep: float):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _past_eof(path: Path):
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 10_000
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data[8 + n:]))


def _link(path: Path, target: str):
    path.unlink()
    path.symlink_to(target)


def _gguf(tmp, good, n_tensors=None, n_kv=None, keep=None):
    path = _copy(good / "tiny.gguf", tmp / "m.gguf")
    data = bytearray(path.read_bytes())
    if n_tensors is not None:
        data[8:16] = struct.pack("<Q", n_tensors)
    if n_kv is not None:
        data[16:24] = struct.pack("<Q", n_kv)
    path.write_bytes(bytes(data[: int(len(data) * keep)] if keep else data))
    return path


def _deep(n=100_000):
    return "[" * n + "]" * n


def _eval_adapter(folder):
    return ["eval", "--model", "tiny-llama", "--adapter", str(folder), "--max-tokens", "8"]


def _eval_model(path):
    return ["eval", "--model", str(path), "--max-tokens", "8"]


def _eval_data(path):
    return ["eval", "--model", "tiny-llama", "--task", "loss", "--data", str(path)]


def _train(tmp, good, *override, text=None, **train):
    return ["train", "--config", str(_yaml(tmp, good, text, **train)), *override]


_GOOD_LINE = (json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n").encode()
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n" + \
             "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                     for p, c in zip("bcdefgh", "cdefghi")) + "train: {seed: *i}\n"

CASES = {
    # code execution
    "auto_map in config.json": (lambda t, g: _eval_model(_auto_map_folder(t, g)), "auto_map"),
    "auto_map in tokenizer_config.json": (
        lambda t, g: _eval_model(_auto_map_folder(t, g, "tokenizer_config.json")), "auto_map"),
    "pickle weights": (lambda t, g: _eval_model(_pickle_folder(t, g)), "safetensors only"),
    # run configs
    "yaml alias bomb": (lambda t, g: _train(t, g, text=ALIAS_BOMB), "YAML aliases are not supported"),
    "yaml deep nesting": (lambda t, g: _train(t, g, text="train: " + _deep(5000)), "nested deeper"),
    "yaml binary": (lambda t, g: _train(t, g, text="train:\x00\x01"), "binary file"),
    "negative lr": (lambda t, g: _train(t, g, lr=-1.0), "train.lr must be a positive"),
    "nan lr": (lambda t, g: _train(t, g, "--train.lr", "nan"), "train.lr must be a finite"),
    "negative seed": (lambda t, g: _train(t, g, seed=-1), "train.seed must be >= 0"),
    "negative warmup": (lambda t, g: _train(t, g, warmup_steps=-3), "train.warmup_steps must be >= 0"),
    "unknown scheduler": (lambda t, g: _train(t, g, scheduler="cosine_wobble"), "train.scheduler 'cosine_wobble'"),
    "output_dir is a file": (lambda t, g: _train(t, g, output_dir=str(_file(t / "f"))), "is a file"),
    "output_dir under a file": (lambda t, g: _train(t, g, output_dir=str(_file(t / "f") / "sub")), "is a file"),
    # data files
    "binary data": (lambda t, g: _eval_data(_file(t / "d.jsonl", b"\x00\x01\x02")), "binary file"),
    "latin-1 data": (lambda t, g: _eval_data(_file(t / "d.txt", "caf\xe9".encode("latin-1"))), "not UTF-8"),
    "dev zero data": (lambda t, g: _eval_data(_link_to(t / "d.jsonl", "/dev/zero")), "not a regular file"),
    "deep jsonl line": (lambda t, g: _eval_data(_file(t / "d.jsonl", _GOOD_LINE + _deep().encode())),
                        "record 2 line 2 is nested deeper"),
    "deep csv": (lambda t, g: _eval_data(_file(t / "d.csv", b"a\n\"" + b"x" * 10)), "record"),
    # adapter folders
    "adapter_config string": (lambda t, g: _eval_adapter(_adapter(t, g, lambda d: '"x"', "adapter_config.json")),
                              "must be a JSON object"),
    "adapter record number": (lambda t, g: _eval_adapter(_adapter(t, g, lambda d: "7")), "must be a JSON object"),
    "adapter record list": (lambda t, g: _eval_adapter(_adapter(t, g, lambda d: "[1, 2]")), "must be a JSON object"),
    "adapter key missing": (lambda t, g: _eval_adapter(_adapter(t, g, lambda d: d.pop("adapter"))), "no 'adapter'"),
    "pool_in missing": (lambda t, g: _eval_adapter(_adapter(t, g, lambda d: [r.pop("pool_in") for r in
                                                                             d["layers"].values()])), "pool_in"),
    "alpha x": (lambda t, g: _eval_adapter(_adapter(t, g, lambda d: d["adapter"].update(alpha="x"))), "alpha"),
    "adapter deep nesting": (lambda t, g: _eval_adapter(_adapter(t, g, raw=_deep().encode())), "nested deeper"),
    "adapter not utf-8": (lambda t, g: _eval_adapter(_adapter(t, g, raw=b'{"a": "\xff"}')), "not UTF-8"),
    "rank 10^9": (lambda t, g: _eval_adapter(_adapter(t, g, lambda d: d["adapter"].update(rank=10**9))), "rank"),
    "rank 64 on a rank-4 file": (lambda t, g: _eval_adapter(_adapter(t, g, lambda d: d["adapter"].update(rank=64))),
                                 "do not belong together"),
    "adapter truncated": (lambda t, g: _eval_adapter(_damage(_adapter(t, g), _truncate, 0.6)), "safetensors"),
    "adapter empty": (lambda t, g: _eval_adapter(_damage(_adapter(t, g), _truncate, 0.0)), "too short"),
    "adapter random": (lambda t, g: _eval_adapter(_damage(_adapter(t, g), _random_bytes)), "safetensors"),
    "adapter offsets past eof": (lambda t, g: _eval_adapter(_damage(_adapter(t, g), _past_eof)), "safetensors"),
    "adapter symlink to system file": (lambda t, g: _eval_adapter(_damage(_adapter(t, g), _link, "/etc/passwd")),
                                       "safetensors"),
    "adapter symlink to dev zero": (lambda t, g: _eval_adapter(_damage(_adapter(t, g), _link, "/dev/zero")),
                                    "adapter_model.safetensors"),
    # native quantized folders
    "manifest list": (lambda t, g: _eval_model(_quantized(t, g, lambda d: "[]")), "must be a JSON object"),
    "manifest invalid json": (lambda t, g: _eval_model(_quantized(t, g, raw=b"{oops")), "not valid JSON"),
    "manifest not utf-8": (lambda t, g: _eval_model(_quantized(t, g, raw=b'{"\xfe": 1}')), "not UTF-8"),
    "manifest wrong format": (lambda t, g: _eval_model(_quantized(t, g, lambda d: [
        v.update(format="int9") for v in d["layers"].values()])), "qbara_quant.json"),
    "manifest block_size string": (lambda t, g: _eval_model(_quantized(t, g, lambda d: [
        v.update(block_size="32") for v in d["layers"].values()])), "block_size"),
    "manifest nonexistent layer": (lambda t, g: _eval_model(_quantized(t, g, lambda d: d["layers"].update(
        {"model.nope": next(iter(d["layers"].values()))}))), "model.nope"),
    "manifest format_version": (lambda t, g: _eval_model(_quantized(t, g, lambda d: d.update(format_version=9))),
                                "format_version"),
    "weights missing": (lambda t, g: _eval_model(_rm(_quantized(t, g), "qbara_model.safetensors")), "missing"),
    "config missing": (lambda t, g: _eval_model(_rm(_quantized(t, g), "config.json")), "config.json"),
    "config invalid": (lambda t, g: _eval_model(_quantized(t, g, raw=b"{", name="config.json")), "not valid JSON"),
    "unknown model_type": (lambda t, g: _eval_model(_quantized(t, g, lambda d: d.update(model_type="nope"),
                                                               "config.json")), "config.json"),
    "bogus hidden_act": (lambda t, g: _eval_model(_quantized(t, g, lambda d: d.update(hidden_act="nope"),
                                                             "config.json")), "config.json"),
    "vocab 10^9": (lambda t, g: _eval_model(_quantized(t, g, lambda d: d.update(vocab_size=10**9),
                                                       "config.json")), "vocab_size 1000000000"),
    "hf vocab 10^9": (lambda t, g: _eval_model(_hf(t, g, lambda d: d.update(vocab_size=10**9))), "vocab_size"),
    "hf one layer": (lambda t, g: _eval_model(_hf(t, g, lambda d: d.update(num_hidden_layers=1))), "do not fit"),
    "hf hidden_size string": (lambda t, g: _eval_model(_hf(t, g, lambda d: d.update(hidden_size="64"))),
                              "hidden_size must be"),
    "codes shorter (no digest)": (lambda t, g: _eval_model(_shorter_codes(t, g)), "shape"),
    # GGUF
    "gguf huge tensor count": (lambda t, g: _eval_model(_gguf(t, g, n_tensors=2**60)), "tensors"),
    "gguf huge kv count": (lambda t, g: _eval_model(_gguf(t, g, n_kv=2**60)), "metadata entries"),
    "gguf truncated": (lambda t, g: _eval_model(_gguf(t, g, keep=0.5)), "gguf"),
    # outputs
    "out is the working folder": (lambda t, g: ["merge", "--model", "tiny-llama", "--adapter",
                                                str(g / "adapter"), "--out", "."], "working folder"),
    "out is a file": (lambda t, g: ["merge", "--model", "tiny-llama", "--adapter", str(g / "adapter"), "--out",
                                    str(_file(t / "x"))], "is a file"),
    "gguf out is a folder": (lambda t, g: ["export", "--model", "tiny-llama", "--out", str(_dir(t / "x.gguf"))],
                             "is a folder"),
}


def _file(path: Path, data: bytes = b"x") -> Path:
    path.write_bytes(data)
    return path


def _dir(path: Path) -> Path:
    path.mkdir()
    return path


def _link_to(path: Path, target: str) -> Path:
    path.symlink_to(target)
    return path


def _rm(folder: Path, name: str) -> Path:
    (folder / name).unlink()
    return folder


def _damage(folder: Path, how, *args) -> Path:
    how(_weights(folder), *args)
    return folder


def _random_bytes(path: Path):
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))


def _pickle_folder(tmp, good):
    folder = _copy(good / "hf", tmp / "pickled")
    (folder / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    return folder


def _hf(tmp, good, edit):
    folder = _copy(good / "hf", tmp / "hf")
    _edit_json(folder / "config.json", edit)
    return folder


def _shorter_codes(tmp, good):
    from safetensors.torch import load_file, save_file

    folder = _quantized(tmp, good, lambda d: d.pop("weights_sha256") and None)
    path = folder / "qbara_model.safetensors"
    state = load_file(str(path))
    key = next(k for k in state if k.endswith(".codes"))
    state[key] = state[key][:-1].clone()
    save_file(state, str(path))
    return folder


def _check_one_line(rc, err):
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(case, good, tmp_path, capsys, monkeypatch):
    build, message = CASES[case]
    monkeypatch.chdir(tmp_path)
    argv = build(tmp_path, good)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    _check_one_line(rc, err)
    assert message.lower() in err.lower(), err


# The same inputs through the library: a QbaraError, never another exception.
API_CASES = ["auto_map in config.json", "pickle weights", "adapter record list", "alpha x", "rank 10^9",
             "adapter symlink to dev zero", "manifest list", "vocab 10^9", "gguf huge kv count", "hf one layer"]


@pytest.mark.parametrize("case", API_CASES)
def test_bad_input_through_the_api_is_a_qbara_error(case, good, tmp_path):
    from qbara import from_pretrained

    argv = CASES[case][0](tmp_path, good)
    model = argv[argv.index("--model") + 1]
    adapter = argv[argv.index("--adapter") + 1] if "--adapter" in argv else None
    with pytest.raises(QbaraError):
        from_pretrained(model, adapter=adapter)


def test_run_config_and_data_through_the_api(tmp_path, good):
    from qbara.train.config import load_run_config
    from qbara.train.data import read_records

    with pytest.raises(QbaraError, match="YAML aliases"):
        load_run_config(str(_yaml(tmp_path, good, ALIAS_BOMB)))
    with pytest.raises(QbaraError, match="not a regular file"):
        read_records("/dev/zero")
    records = read_records(str(_file(tmp_path / "d.jsonl", (_deep(200) + "\n{}").encode())))
    assert "nested deeper" in records[0].reason and records[1] == {}


@pytest.mark.parametrize("case", ["yaml alias bomb", "adapter record list"])
def test_bad_input_in_a_real_process(case, good, tmp_path):
    argv = CASES[case][0](tmp_path, good)
    run = subprocess.run([sys.executable, "-m", "qbara", *argv], env=ENV, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    _check_one_line(run.returncode, run.stderr)


def test_chat_template_sandbox_escape_is_one_error(tmp_path):
    from qbara.train.data import build_examples

    _, tok = tiny_llama()
    tok.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(QbaraError, match="leave jinja's sandbox"):
        build_examples([record], tok, "chat", 64, on_error="skip")


# ---------------------------------------------------------------- no prompt, no foreign code, on a terminal


def test_auto_map_folder_on_a_terminal_never_prompts_nor_runs_code(good, tmp_path):
    folder = _copy(good / "hf", tmp_path / "custom")
    ran = tmp_path / "code_ran"
    (folder / "evil.py").write_text(f"open({str(ran)!r}, 'w').write('ran')\n"
                                    "from transformers import PretrainedConfig\n"
                                    "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    _edit_json(folder / "config.json", lambda d: d.update(model_type="evil", auto_map={
        "AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}))
    pid, fd = pty.fork()
    if pid == 0:  # the child: qbara on a terminal, stdin included
        os.chdir(tmp_path)
        os.execve(sys.executable, [sys.executable, "-m", "qbara", "eval", "--model", str(folder)], ENV)
    output, deadline = b"", time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            if b"[y/N]" in output:
                os.write(fd, b"y\n")  # what a user might answer: must never matter
    else:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    text = output.decode(errors="replace")
    assert "[y/N]" not in text, text
    assert os.waitstatus_to_exitcode(status) == 2, text
    assert "auto_map" in text and "Traceback" not in text
    assert not ran.exists()


# ---------------------------------------------------------------- outputs: faults while writing


def test_write_faults_are_one_line_and_keep_the_previous_output(good, tmp_path, capsys, monkeypatch):
    import errno

    import qbara.export.hf as hf

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "merged"
    argv = ["merge", "--model", "tiny-llama", "--adapter", str(good / "adapter"), "--out", str(out)]
    assert main(argv) == 0
    before = sorted(p.name for p in out.iterdir())
    for code in (errno.ENOSPC, errno.EROFS, errno.EFBIG):
        def failing(model, tokenizer, folder, **kw):
            (Path(folder) / "model.safetensors").write_bytes(b"half")
            raise OSError(code, os.strerror(code), str(Path(folder) / "model.safetensors"))

        monkeypatch.setattr(hf, "write_hf", failing)
        capsys.readouterr()
        rc = main(argv)
        err = capsys.readouterr().err
        _check_one_line(rc, err)
        assert os.strerror(code) in err and "previous output" in err
        assert sorted(p.name for p in out.iterdir()) == before
        assert not list(tmp_path.glob(".merged.qbara-new-*"))


def test_file_size_limit_mid_write_is_one_line(good, tmp_path):
    import resource

    out = tmp_path / "m.gguf"
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # noqa: E731
    run = subprocess.run([sys.executable, "-m", "qbara", "export", "--model", str(good / "quantized"), "--out",
                          str(out), "--allow-requantize"], env=ENV, capture_output=True, text=True, timeout=180,
                         cwd=tmp_path, preexec_fn=limit)
    _check_one_line(run.returncode, run.stderr)
    assert f"cannot write {out}" in run.stderr and "previous output" in run.stderr, run.stderr
    assert not out.exists() and not list(tmp_path.glob(".m.gguf.*"))


# ---------------------------------------------------------------- resume: damaged checkpoints


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, good):
    """A 4-step run with checkpoints at steps 2 and 4."""
    from qbara.train.config import build_config
    from qbara.train.trainer import train

    tmp = tmp_path_factory.mktemp("run")
    config = yaml.safe_load(_yaml(tmp, good, steps=4, save_steps=2, save_total_limit=3).read_text())
    train(build_config(config))
    return Path(config["train"]["output_dir"]), config


DAMAGE = {
    "truncated optimizer.pt": lambda c: _truncate(c / "optimizer.pt", 0.5),
    "truncated adapter": lambda c: _truncate(c / "adapter_model.safetensors", 0.7),
    "trainer_state missing": lambda c: (c / "trainer_state.json").unlink(),
    "trainer_state invalid": lambda c: (c / "trainer_state.json").write_text("{"),
    "one byte changed": lambda c: _flip(c / "adapter_model.safetensors", -3),
    "marker forged on an empty checkpoint": lambda c: [p.unlink() for p in c.iterdir()
                                                       if p.name != "qbara_complete.json"],
    "old marker, truncated optimizer.pt": lambda c: ((c / "qbara_complete.json").write_text('{"step": 4}'),
                                                     _truncate(c / "optimizer.pt", 0.5)),
    "marker not json": lambda c: (c / "qbara_complete.json").write_bytes(b"\xff"),
}


def _flip(path: Path, at: int):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_found(damage, run_dir, tmp_path):
    from qbara.train.trainer import checkpoint_problem

    out = _copy(run_dir[0], tmp_path / "out")
    assert checkpoint_problem(out / "checkpoint-4") is None
    DAMAGE[damage](out / "checkpoint-4")
    assert checkpoint_problem(out / "checkpoint-4") is not None


def test_resume_skips_a_damaged_checkpoint(run_dir, tmp_path, capsys):
    from qbara.train.config import build_config
    from qbara.train.trainer import latest_complete_checkpoint, train

    out = _copy(run_dir[0], tmp_path / "out")
    _truncate(out / "checkpoint-4" / "optimizer.pt", 0.5)
    config = json.loads(json.dumps(run_dir[1]))
    config["train"].update(output_dir=str(out), steps=6)
    train(build_config(config), resume=True)
    err = capsys.readouterr().err
    assert "checkpoint 4 is damaged (optimizer.pt" in err and "resuming from checkpoint 2" in err, err
    assert latest_complete_checkpoint(out).name == "checkpoint-6"
    assert (out / "checkpoint-4.damaged" / "optimizer.pt").is_file()  # set aside, not deleted


# ---------------------------------------------------------------- random damage never loads as valid


class _Timeout(Exception):
    pass


def _with_deadline(seconds, call):
    def alarm(*_):
        raise _Timeout

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        return call()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _mutate(rng: random.Random, path: Path):
    data = bytearray(path.read_bytes())
    kind = rng.choice(["flip", "flip", "truncate", "insert", "zero"])
    if kind == "truncate":
        data = data[: rng.randrange(len(data))]
    elif kind == "insert":
        at = rng.randrange(len(data))
        data[at:at] = rng.randbytes(rng.randint(1, 8))
    elif kind == "zero":
        at = rng.randrange(len(data))
        data[at:at + 64] = bytes(len(data[at:at + 64]))
    else:
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(min(len(data), 400)) if rng.random() < 0.5 else rng.randrange(len(data))
            data[at] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["adapter", "quantized", "gguf"])
def test_random_damage_never_tracebacks_hangs_or_loads_changed(kind, good, tmp_path):
    from qbara import load_adapter
    from qbara.models import load_model

    def load(path):
        if kind == "adapter":
            model, _ = load_model("tiny-llama", quant=QUANT)
            return load_adapter(model, path)
        return load_model(str(path))[0]

    source = good / ("tiny.gguf" if kind == "gguf" else kind)
    reference = _state(load(source))
    rng = random.Random(14)
    outcomes = []
    for case in range(30):
        target = _copy(source, tmp_path / f"{case}{source.suffix}")
        files = [target] if target.is_file() else sorted(p for p in target.iterdir() if p.is_file())
        _mutate(rng, rng.choice(files))
        start = time.monotonic()
        try:
            loaded = _state(_with_deadline(30, lambda: load(target)))
        except QbaraError as err:
            assert "\n" not in str(err).strip() or "Traceback" not in str(err)
            outcomes.append("refused")
        else:
            outcomes.append("loaded")
            assert loaded.keys() == reference.keys()
            for key, tensor in loaded.items():
                assert tensor.shape == reference[key].shape, key  # never a tensor of another size
                if kind != "gguf":  # digests recorded: a loaded file holds exactly the tensors written
                    assert torch.equal(tensor, reference[key]), key
        assert time.monotonic() - start < 30
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert "refused" in outcomes
