"""`qbara eval --task lm-eval`: local task YAMLs, --limit / --num-fewshot / --batch-size / --output-path, and one
clear line (exit 2) for unknown tasks and for Hub datasets offline. The tests that run lm-eval skip without it."""
import argparse
import json
import math
import sys

import numpy as np
import pytest
import torch

from qbara.cli import main
from qbara.eval.harness import jsonable, parse_limit


def _task_folder(tmp_path, name="mytask", rows=8, data_files=None):
    """A folder with one multiple-choice task YAML whose dataset is a local JSON-lines file."""
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(i), "7"],
                                        "answer": 0}) + "\n" for i in range(rows)))
    folder = tmp_path / "tasks"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_files or data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return folder


def _one_line_error(capsys, args):
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def offline(monkeypatch):
    """lm-eval (else skip), offline for huggingface_hub and datasets whatever they read from the environment."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def test_local_task_runs_and_writes_the_results(tmp_path, capsys, offline):
    folder = _task_folder(tmp_path)
    out = tmp_path / "results" / "r.json"
    capsys.readouterr()
    assert main(["eval", "--model", "tiny-llama", "--task", "lm-eval", "--data", "mytask", "--include-path",
                 str(folder), "--limit", "4", "--num-fewshot", "1", "--batch-size", "2", "--output-path", str(out),
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["task"] == "lm-eval" and printed["model"] == "tiny-llama"
    assert printed["output_path"] == str(out) and printed["limit"] == 4
    assert printed["results"]["mytask"]["sample_len"] == 4

    def no_nan(text):
        raise AssertionError(f"{text} in the results file is not JSON")

    saved = json.loads(out.read_text(), parse_constant=no_nan)
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]  # written atomically: no temporary left
    task = saved["results"]["mytask"]
    assert task["sample_len"] == 4 and 0.0 <= task["acc,none"] <= 1.0
    assert saved["n-shot"]["mytask"] == 1
    assert saved["config"]["limit"] == 4 and saved["config"]["batch_size"] == 2
    assert saved["qbara"] == {"model": "tiny-llama", "adapter": None, "tasks": ["mytask"]}
    assert "samples" not in saved

    # A group of local tasks (its score aggregated) and a fraction of each task; the text report names them.
    (folder / "group.yaml").write_text("group: mygroup\ntask:\n  - mytask\naggregate_metric_list:\n"
                                       "  - metric: acc\n    aggregation: mean\n")
    assert main(["eval", "--model", "tiny-llama", "--task", "lm-eval", "--data", "mygroup", "--include-path",
                 str(folder), "--limit", "0.25", "--output-path", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mytask: acc,none=" in text and "mygroup: acc,none=" in text
    saved = json.loads(out.read_text())
    assert saved["results"]["mytask"]["sample_len"] == 2 and "mygroup" in saved["groups"]


def test_hub_task_offline_is_one_line(capsys, offline):
    line = _one_line_error(capsys, ["eval", "--model", "tiny-llama", "--task", "lm-eval", "--data", "arc_easy"])
    assert line == ("qbara eval: error: task arc_easy needs the Hub (offline here); point --include-path at a "
                    "folder with a local task YAML whose dataset is local")


def test_unknown_and_broken_tasks_are_one_line(tmp_path, capsys, offline):
    folder = _task_folder(tmp_path, data_files=tmp_path / "missing.jsonl")
    base = ["eval", "--model", "tiny-llama", "--task", "lm-eval", "--include-path", str(folder)]
    line = _one_line_error(capsys, [*base, "--data", "mytaskk"])
    assert "unknown lm-eval task 'mytaskk': did you mean mytask?" in line and "lm-eval ls tasks" in line
    line = _one_line_error(capsys, [*base, "--data", "mytask"])
    assert "task mytask: its dataset could not be found" in line and "missing.jsonl" in line


def test_lm_eval_options_are_checked_before_any_work(tmp_path, capsys):
    (tmp_path / "dir").mkdir()
    base = ["eval", "--model", "tiny-llama"]
    line = _one_line_error(capsys, [*base, "--task", "lm-eval", "--data", "x", "--output-path", str(tmp_path / "dir")])
    assert "--output-path" in line and "is a folder" in line
    (tmp_path / "file").write_text("")
    line = _one_line_error(capsys, [*base, "--task", "lm-eval", "--data", "x", "--output-path",
                                    str(tmp_path / "file" / "r.json")])
    assert "is a file, not a folder" in line
    line = _one_line_error(capsys, [*base, "--task", "ppl", "--limit", "4", "--num-fewshot", "1"])
    assert "--limit, --num-fewshot only apply to --task lm-eval" in line
    assert "needs --data" in _one_line_error(capsys, [*base, "--task", "lm-eval"])
    with pytest.raises(SystemExit):
        main([*base, "--task", "lm-eval", "--data", "x", "--limit", "1.5"])


def test_missing_lm_eval_names_the_install(monkeypatch, capsys):
    for module in ("lm_eval", "lm_eval.tasks"):  # importing lm-eval fails, installed (and imported) or not
        monkeypatch.setitem(sys.modules, module, None)
    line = _one_line_error(capsys, ["eval", "--model", "tiny-llama", "--task", "lm-eval", "--data", "arc_easy"])
    assert "pip install lm-eval" in line


def test_limit_parsing():
    assert parse_limit("4") == 4 and isinstance(parse_limit("4"), int)
    assert parse_limit("100.0") == 100 and parse_limit("0.1") == 0.1
    for bad in ("0", "-1", "1.5", "x", "1"[:0]):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_limit(bad)


def test_results_are_made_json():
    raw = {"a": (np.float32(0.5), np.int64(3), np.bool_(True)), "nan": float("nan"), "dtype": torch.float16,
           "t": torch.tensor(2.0), 1: {"s": {"x"}}, "f": math.inf, "fn": len}
    assert jsonable(raw) == {"a": [0.5, 3, True], "nan": None, "dtype": "torch.float16", "t": 2.0,
                              "1": {"s": ["x"]}, "f": None, "fn": "<built-in function len>"}
    json.dumps(jsonable(raw), allow_nan=False)
