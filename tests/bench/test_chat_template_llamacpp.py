"""The qbara side of bench/chat_template_llamacpp.py: the prompts it hands llama.cpp are the training tokens
before each assistant turn, and its scoring counts matches, misses and an unrecognised template apart."""
import sys
from pathlib import Path

from qbara.models import tiny_llama
from qbara.prompt_formats import instruction_messages, resolve_template
from qbara.train.data import build_examples

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import chat_template_llamacpp as bench  # noqa: E402


def _conversations(template: str = "alpaca"):
    _, tokenizer = tiny_llama()
    fmt = resolve_template(template, tokenizer)
    examples = build_examples(bench.CHATS, tokenizer, "chat", 512, template=fmt)
    convs = bench.conversations(examples, [c["messages"] for c in bench.CHATS], fmt.template)
    return tokenizer, fmt, convs


def test_each_assistant_turn_gives_the_prompt_inference_tokenizes():
    tokenizer, fmt, convs = _conversations()
    assert len(convs) == sum(m["role"] == "assistant" for c in bench.CHATS for m in c["messages"]) == 4
    for conv in convs:
        text = fmt.template.render(conv["prompt_messages"], add_generation_prompt=True)
        assert conv["expected_prompt_text"] == text
        assert conv["expected_prompt"] == tokenizer(text, add_special_tokens=False).input_ids
    whole = [c for c in convs if c["full_messages"] is not None]
    assert len(whole) == len(bench.CHATS) and all(c["expected_full_text"].endswith(tokenizer.eos_token) for c in whole)


def test_instruction_records_become_the_conversations_training_renders():
    record = bench.RECORDS[1]
    messages = instruction_messages(record["instruction"], record["output"], record["input"])
    assert messages[0] == {"role": "user", "content": "Add the numbers.\n\n2 and 3"}


def test_score_counts_matches_misses_and_an_unrecognised_template():
    _, _, convs = _conversations()
    same = [{f"{kind}_{part}{what}": c[f"expected_{part}{what}"] for kind in ("jinja", "native")
             for part in ("prompt", "full") for what in ("", "_text")} | {"tokenizer_prompt": c["expected_prompt"]}
            for c in convs]
    row = bench.score(convs, same)
    assert row["jinja_prompt_ids_equal"] == row["native_prompt_text_equal"] == 4
    assert row["jinja_full_ids_equal"] == row["full_conversations"] == 2 and row["tokenizer_differs_on"] == []
    off = [dict(g, jinja_prompt=g["jinja_prompt"] + [0], native_prompt=None, native_prompt_text=None) for g in same]
    row = bench.score(convs, off)
    assert row["jinja_prompt_ids_equal"] == 0 and row["native_prompt_ids_equal"] is None
    table = bench.markdown([{**row, "case": "x", "prompts": 4, "embedded_equals_recorded": True,
                             "seconds_train_export": 1.0}], {"date": "d", "llama_cpp": "v", "steps": 2, "command": "c"})
    assert "| x | yes | 4/4 / 0/4 |" in table and "not recognised" in table
