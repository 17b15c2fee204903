"""Ctrl-C: a real SIGINT to `qbara train` and `qbara lq` subprocesses: one line on stderr, exit 130, no temporary
left behind, and (lq) its worker threads stopped at once."""
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qbara.cli import main
from tests.train.test_trainer import _config

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
PROGRESS = re.compile(r"^[^:\n]*: +\d+%\|")  # a tqdm bar line


def _start(args, cwd: Path, stderr: Path) -> subprocess.Popen:
    """`python -m qbara ARGS` with SIGINT handled as in a terminal (a background job inherits it ignored)."""
    return subprocess.Popen([sys.executable, "-m", "qbara", *args], cwd=cwd, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=stderr.open("w"), text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(condition, proc, timeout=300.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, "the command ended before it could be interrupted"
        assert time.time() < deadline, "the command never reached the point to interrupt"
        time.sleep(0.05)


def _interrupt(proc: subprocess.Popen) -> float:
    """SIGINT, then the seconds the process took to exit."""
    start = time.time()
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("still running 60 s after SIGINT") from None
    return time.time() - start


def _lines(stderr: Path) -> list[str]:
    """The lines written to stderr, without progress bars and library notices (bitsandbytes' kernels)."""
    text = stderr.read_text()
    return [line for line in re.split(r"[\r\n]", text) if line.strip() and not PROGRESS.match(line)
            and "kernels" not in line]


def test_train_interrupted_prints_one_line_with_the_resume_command(tmp_path):
    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path, steps=100000, save_steps=2)))
    stderr = tmp_path / "stderr"
    proc = _start(["train", "--config", str(config), "--train.lr", "1e-3"], tmp_path, stderr)
    out = tmp_path / "out"
    _wait_for(lambda: (out / "checkpoint-4" / "qbara_complete.json").exists(), proc)
    _interrupt(proc)
    assert proc.returncode == 130, stderr.read_text()
    lines = _lines(stderr)
    assert len(lines) == 1, lines
    match = re.fullmatch(r"qbara train: interrupted at step (\d+) \(last checkpoint: step (\d+)\); resume with: (.*)",
                         lines[0])
    assert match, lines[0]
    step, saved = int(match.group(1)), int(match.group(2))
    assert step >= saved >= 4 and saved % 2 == 0
    assert (out / f"checkpoint-{saved}" / "qbara_complete.json").is_file()
    assert shlex.split(match.group(3)) == ["qbara", "train", "--config", str(config), "--train.lr", "1e-3",
                                           "--resume"]
    assert not (out / "adapter").exists() and not (out / ".qbara-output.json").exists()  # nothing looks complete
    assert not (tmp_path / ".out.qbara-lock").exists()
    assert not [p for p in tmp_path.iterdir() if ".qbara-new-" in p.name]


def test_lq_interrupted_stops_its_workers_at_once_and_removes_its_temporary(tmp_path):
    stderr = tmp_path / "stderr"
    # LoftQ for a million alternations on two worker threads: minutes of work per matrix.
    proc = _start(["lq", "--model", "tiny-llama", "--out", "lq", "--method", "loftq", "--loftq-iters", "1000000",
                   "--rank", "8", "--workers", "2"], tmp_path, stderr)
    _wait_for(lambda: "LoftQ init" in stderr.read_text(), proc)
    time.sleep(0.5)  # the workers are inside their matrices
    seconds = _interrupt(proc)
    assert proc.returncode == 130, stderr.read_text()
    assert seconds < 5, f"took {seconds:.1f} s to stop"
    lines = _lines(stderr)
    assert len(lines) == 1, lines
    assert re.fullmatch(r"qbara lq: interrupted; removed the unfinished output \.lq\.qbara-new-\w+, lq is as it was",
                        lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stderr"]  # no temporary, no lock, no output


@pytest.mark.parametrize("verb", [["eval", "--model", "tiny-llama"], ["quantize", "--model", "tiny-llama"]])
def test_other_verbs_print_one_line_and_exit_130(verb, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("qbara.commands.eval.load_for_eval", interrupted)
    monkeypatch.setattr("qbara.commands.quantize.load_model", interrupted)
    assert main(verb) == 130
    assert capsys.readouterr().err == f"qbara {verb[0]}: interrupted\n"


def test_run_per_matrix_stops_the_other_workers_when_it_is_interrupted():
    """A matrix that raises (here a KeyboardInterrupt from the main thread's view) stops the running workers at
    their next check_cancelled and cancels the ones not started: the call returns at once, no thread left."""
    import threading

    from qbara.lq.parallel import check_cancelled, run_per_matrix

    started = []

    def work(i):
        started.append(i)
        if i == 0:
            time.sleep(0.2)
            raise KeyboardInterrupt
        deadline = time.time() + 30
        while time.time() < deadline:  # a long decomposition with its cancel points
            check_cancelled()
            time.sleep(0.01)

    def workers():
        return [t for t in threading.enumerate() if not t.daemon]  # tqdm's monitor is a daemon

    threads = workers()
    start = time.time()
    with pytest.raises(KeyboardInterrupt):
        run_per_matrix(list(range(8)), work, sizes=[8 - i for i in range(8)], workers=3, progress=False)
    assert time.time() - start < 5
    assert workers() == threads
    assert len(started) < 8  # those not started were cancelled (one may start before the main thread sees it)


def test_a_run_interrupted_in_its_first_save_can_be_resumed(tmp_path):
    """The output then holds only qbara's unfinished checkpoint (no manifest yet): --resume is not refused as a
    folder of someone else's files, and the unfinished checkpoint is never taken for a complete one."""
    from qbara.errors import QbaraError
    from qbara.train.config import build_config
    from qbara.train.trainer import check_train_output, latest_complete_checkpoint, start_checkpoint

    config = build_config(_config(tmp_path))
    out = Path(config.train.output_dir)
    start_checkpoint(out / "checkpoint-2")
    assert check_train_output(config) == out
    assert latest_complete_checkpoint(out) is None
    (out / "checkpoint-2" / ".qbara-saving").unlink()  # a checkpoint-N folder qbara did not start: not ours
    with pytest.raises(QbaraError, match="not written by qbara"):
        check_train_output(config)
