import json

import pytest

from qbara.errors import QbaraError
from qbara.models.tiny import byte_tokenizer
from qbara.train.data import IGNORE_INDEX, PadCollator, build_examples, read_records

TOK = byte_tokenizer()
# The classic Alpaca prompt for an instruction without input, written out by hand (Taori et al., 2023).
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request.\n\n### Instruction:\n{}\n\n### Response:\n")


def test_instruction_prompt_is_masked_token_by_token():
    record = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
    (example,) = build_examples([record], TOK, "instruction", 1024, template="alpaca")
    prompt = ALPACA_PROMPT.format("Add 2 and 3.")
    prompt_len = len(prompt.encode())  # byte tokenizer: one token per byte
    assert example.input_ids[:prompt_len] == list(prompt.encode())
    assert example.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert example.labels[prompt_len:] == list(b"5") + [TOK.eos_token_id]
    assert example.input_ids[prompt_len:] == example.labels[prompt_len:]
    assert not example.truncated


def test_instruction_input_follows_the_instruction_in_the_user_turn():
    """data.template auto with a tokenizer that has a chat template (ChatML here): the record is a user / assistant
    exchange, its input after the instruction and a blank line."""
    record = {"instruction": "Translate.", "input": "bonjour", "output": "hello"}
    (example,) = build_examples([record], TOK, "auto", 1024)
    prompt = "<|im_start|>user\nTranslate.\n\nbonjour<|im_end|>\n<|im_start|>assistant\n"
    n = len(TOK(prompt, add_special_tokens=False).input_ids)
    assert example.input_ids[:n] == TOK(prompt, add_special_tokens=False).input_ids
    assert example.labels[:n] == [IGNORE_INDEX] * n
    assert TOK.decode(example.labels[n:]) == "hello<|im_end|>\n"


def test_a_record_cut_at_max_length_is_marked_truncated():
    record = {"instruction": "Say it.", "output": "x" * 50}
    (whole,) = build_examples([record], TOK, "instruction", 1024, template="alpaca")
    (cut,) = build_examples([record], TOK, "instruction", len(whole.input_ids) - 1, template="alpaca")
    assert not whole.truncated and cut.truncated and cut.input_ids == whole.input_ids[:-1]


def test_chat_only_assistant_turns_are_learned():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"},
                {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    (example,) = build_examples([{"messages": messages}], TOK, "auto", 4096)
    full = TOK.apply_chat_template(messages, tokenize=False)
    assert example.input_ids == TOK(full, add_special_tokens=False).input_ids
    # Expected learned text: what each assistant turn adds after its generation prompt.
    expected = []
    for i in (1, 3):
        prefix = TOK.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = TOK.apply_chat_template(messages[: i + 1], tokenize=False)
        assert full.startswith(prefix)
        expected += TOK(upto[len(prefix):], add_special_tokens=False).input_ids
    learned = [t for t in example.labels if t != IGNORE_INDEX]
    assert learned == expected
    assert "hello!" in TOK.decode(learned) and "2+2?" not in TOK.decode(learned)


def test_malformed_record_names_its_number_or_is_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"instruction": "a", "output": "b"}), "{oops", json.dumps({"instruction": "c"})]
    path.write_text("\n".join(lines))
    records = read_records(str(path))
    with pytest.raises(QbaraError, match=r"record 2 line 2 is not valid JSON.*data.on_error=skip"):
        build_examples(records, TOK, "instruction", 512, "fail", source=str(path))
    with pytest.warns(UserWarning, match="skipped 2 malformed records"):
        examples = build_examples(records, TOK, "instruction", 512, "skip", source=str(path))
    assert len(examples) == 1


def test_text_is_packed_into_full_sequences():
    examples = build_examples([{"text": "a" * 100}, {"text": "b" * 50}], TOK, "text", 32)
    assert len(examples) == (100 + 1 + 50 + 1) // 32
    assert all(len(e.input_ids) == 32 and e.labels == e.input_ids for e in examples)


def test_collator_pads_with_masked_labels():
    batch = PadCollator(TOK.pad_token_id)([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
                                           {"input_ids": [4], "labels": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, TOK.pad_token_id, TOK.pad_token_id]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(QbaraError, match="not found"):
        read_records(str(tmp_path / "none.jsonl"))
    bad = tmp_path / "x.parquet"
    bad.write_bytes(b"")
    with pytest.raises(QbaraError, match="unsupported data file type"):
        read_records(str(bad))
