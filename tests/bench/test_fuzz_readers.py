"""The reader fuzz harness (bench/fuzz_readers.py): its classification, its worker pool, and a handful of seeded
mutations that qbara already refuses cleanly (no traceback, hang or crash)."""
import json
import random
import struct
import sys
from pathlib import Path

import pytest
import torch

from qbara.errors import QbaraError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import fuzz_readers as fr  # noqa: E402


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = fr.build_seeds(tmp_path_factory.mktemp("fuzz") / "seeds")
    return root, torch.load(root / "refs.pt", weights_only=False)


def _classify(seeds, job):
    root, refs = seeds
    return fr.classify(job["target"], job["path"], refs[job["target"]])


@pytest.mark.parametrize("target", ["adapter-qahira", "gguf", "yaml", "data-csv"])
def test_an_unchanged_seed_is_ok_equal(seeds, target):
    root, refs = seeds
    assert fr.classify(target, str(root / fr.TARGETS[target][0]), refs[target]) == {"outcome": "ok-equal"}


def test_a_changed_result_is_ok_changed_and_says_what_changed(seeds, tmp_path):
    root, refs = seeds
    path = tmp_path / "data.txt"
    path.write_text(fr.TEXT + "More words than before, enough to change the packed sequences.\n")
    answer = fr.classify("data-txt", str(path), refs["data-txt"])
    assert answer["outcome"] == "ok-changed" and "items" in answer["message"]


def test_a_non_qbara_exception_is_a_traceback_with_its_type_and_location(seeds, monkeypatch):
    def raising(path):
        raise ValueError("deliberately raised")

    monkeypatch.setattr(fr, "_read_yaml", raising)
    answer = fr.classify("yaml", "unused.yaml", None)
    assert answer["outcome"] == "traceback" and answer["type"] == "ValueError"
    assert answer["message"] == "deliberately raised" and "raising" in answer["location"]

    def multi_line(path):
        raise QbaraError("first line\nsecond line")

    monkeypatch.setattr(fr, "_read_yaml", multi_line)
    assert fr.classify("yaml", "unused.yaml", None)["type"] == "QbaraError(multi-line)"


def test_a_qbara_error_is_a_clean_error(seeds, tmp_path):
    answer = fr.classify("yaml", str(tmp_path / "missing.yaml"), seeds[1]["yaml"])
    assert answer["outcome"] == "clean-error" and "not found" in answer["message"]


def test_cases_are_deterministic_for_a_seed(seeds, tmp_path):
    root, _ = seeds
    first = fr.make_case(root, "gguf", 3, 7, tmp_path / "a")
    second = fr.make_case(root, "gguf", 3, 7, tmp_path / "b")
    assert first["mutation"] == second["mutation"]
    assert Path(first["path"]).read_bytes() == Path(second["path"]).read_bytes()


@pytest.mark.parametrize("target,file", [("adapter-lora", "adapter_model.safetensors"),
                                         ("native", "qbara_model.safetensors")])
def test_truncated_safetensors_is_a_clean_error(seeds, tmp_path, target, file):
    for index in range(3):
        job = fr.make_case(seeds[0], target, index, 0, tmp_path / str(index), "byte", "truncate", file)
        assert _classify(seeds, job)["outcome"] == "clean-error", job["mutation"]


@pytest.mark.parametrize("field", ["n_tensors", "n_kv"])
def test_forged_gguf_top_level_counts_are_clean_errors(seeds, tmp_path, field):
    root, refs = seeds
    data = bytearray((root / "tiny.gguf").read_bytes())
    at = {"n_tensors": 8, "n_kv": 16}[field]
    assert [f for f in fr.gguf_fields(bytes(data)) if f[0] == field][0][1] == at
    for value in (2 ** 32, 2 ** 60, 2 ** 64 - 1):
        path = tmp_path / f"{value}.gguf"
        path.write_bytes(data[:at] + struct.pack("<Q", value) + data[at + 8:])
        answer = fr.classify("gguf", str(path), refs["gguf"])
        assert answer["outcome"] == "clean-error", (value, answer)
    job = fr.make_case(root, "gguf", 0, 0, tmp_path / "case", "struct", field)
    assert job["mutation"].startswith(f"tiny.gguf: gguf {field}:")
    assert _classify(seeds, job)["outcome"] not in fr.FAILURES, job["mutation"]


@pytest.mark.parametrize("op", ["alias-bomb", "alias", "python-tag", "deep", "scalar"])
def test_hostile_yaml_is_a_clean_error(seeds, tmp_path, op):
    job = fr.make_case(seeds[0], "yaml", 0, 0, tmp_path, "struct", op)
    assert _classify(seeds, job)["outcome"] == "clean-error", job["mutation"]


@pytest.mark.parametrize("reader", ["data-jsonl", "data-csv", "adapter-qbara"])
def test_a_data_file_or_weights_that_is_a_device_is_a_clean_error(seeds, tmp_path, reader):
    file = "adapter_model.safetensors" if reader.startswith("adapter") else None
    job = fr.make_case(seeds[0], reader, 0, 0, tmp_path, "fs", "symlink:/dev/zero", file)
    assert _classify(seeds, job)["outcome"] == "clean-error", job["mutation"]


def test_json_mutations_write_what_they_describe():
    rng = random.Random(0)
    op, doc, raw, what = "", None, None, ""
    while op != "duplicate-key":
        op, doc, raw, what = fr.json_mutation(rng, {"a": 1, "b": {"c": [1, 2]}})
    text = fr.dump_json(doc, raw)
    assert text.count(f'"{raw[1]}"') == 2, text  # the key really is written twice
    deep = fr.dump_json({"a": fr.SENTINEL}, ("deep", 5))
    assert deep == '{"a": [[[[[]]]]]}'


def test_the_pool_classifies_hangs_crashes_memory_and_exceptions(seeds, tmp_path):
    root, _ = seeds
    fifo = fr.make_case(root, "data-jsonl", 0, 0, tmp_path / "fifo", "fs", "fifo")
    jobs = [{"id": "good", "target": "data-csv", "path": str(root / "data.csv")},
            {**fifo, "id": "fifo"},
            {"id": "raise", "target": "selftest-raise", "path": "", "timeout": 2},
            {"id": "memory", "target": "selftest-memory", "path": ""},
            {"id": "hang", "target": "selftest-hang", "path": "", "timeout": 2},
            {"id": "crash", "target": "selftest-crash", "path": ""},
            {"id": "after", "target": "selftest-ok", "path": ""}]
    cleaned = []
    pairs = [(job, lambda j=job: cleaned.append(j["id"])) for job in jobs]
    answers = {job["id"]: answer for job, answer in fr.run_jobs(pairs, root, tmp_path / "out", workers=1,
                                                                 timeout=20, mem_gib=4)}
    assert answers["good"]["outcome"] == "ok-equal"
    assert answers["fifo"]["outcome"] == "clean-error"  # refused before it is opened: no hang
    assert answers["raise"]["outcome"] == "traceback" and answers["raise"]["type"] == "ValueError"
    assert answers["memory"]["outcome"] == "crash" and answers["memory"]["type"] == "MemoryError"
    assert answers["hang"]["outcome"] == "hang"
    assert answers["crash"]["outcome"] == "crash" and "SIGABRT" in answers["crash"]["type"]
    assert answers["after"]["outcome"] == "ok-changed"  # a fresh worker took over (no reference: changed)
    assert sorted(cleaned) == sorted(answers)


def test_summary_counts_deduplicates_and_writes(tmp_path):
    cases = [{"id": f"gguf:{i}", "reader": "gguf", "target": "gguf", "family": "byte", "op": "flip",
              "file": "tiny.gguf", "outcome": outcome, "type": "IndexError", "location": "qbara/x.py:1 f",
              "mutation": f"tiny.gguf: flip bits {i}", "message": "out/work/cases/gguf-0/tiny.gguf: bad"}
             for i, outcome in enumerate(["traceback", "traceback", "clean-error", "hang", "ok-equal"])]
    summary = fr.summarize(cases, {"seed": 0, "cases_per_reader": 5, "command": "c", "wall_s": 1.0,
                                   "workers": 1, "timeout_s": 60, "mem_gib": 4})
    assert summary["table"]["gguf"]["traceback"] == 2 and summary["table"]["gguf"]["hang"] == 1
    tracebacks = [s for s in summary["signatures"] if s["outcome"] == "traceback"]
    assert len(tracebacks) == 1 and tracebacks[0]["count"] == 2 and tracebacks[0]["case"] == "gguf:0"
    assert tracebacks[0]["message"] == "tiny.gguf: bad"  # the case's folder is left out
    assert summary["signatures"][0]["outcome"] == "hang"  # worst first
    summary["cases"] = [fr.compact(case) for case in cases]
    fr.write_summary(summary, tmp_path / "summary.json")
    assert json.loads((tmp_path / "summary.json").read_text())["cases"][4] == {
        "id": "gguf:4", "op": "tiny.gguf: flip", "outcome": "ok-equal"}
    text = fr.markdown(summary)
    assert "| gguf | 1 | 1 | 0 | 2 | 1 | 0 | 5 |" in text and "--replay gguf:0 --seed 0" in text
