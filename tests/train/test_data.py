import json

import pytest
from tokenizers.processors import TemplateProcessing

from qbara.data.special_tokens import leading_bos
from qbara.errors import QbaraError
from qbara.models.embedded import GEMMA3_270M, cache_root
from qbara.models.files import load_tokenizer
from qbara.models.tiny import CHATML_TEMPLATE, byte_tokenizer
from qbara.train.data import IGNORE_INDEX, PadCollator, build_examples, read_records

TOK = byte_tokenizer()


def _bos_tokenizer(chat_template: str = CHATML_TEMPLATE):
    """The byte tokenizer with a <bos> that encoding with special tokens puts before every text, as Gemma's does."""
    tok = byte_tokenizer()
    tok.add_special_tokens({"bos_token": "<bos>"})
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<bos> $A",
                                                              special_tokens=[("<bos>", tok.bos_token_id)])
    tok.chat_template = chat_template
    assert leading_bos(tok) == tok.bos_token_id and leading_bos(TOK) is None
    return tok


def _byte_stream(texts: list[str], eos: int) -> list[int]:
    """The packed token stream by hand: each text's UTF-8 bytes (one token each), then EOS."""
    return [t for text in texts for t in [*text.encode(), eos]]
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


TEXTS = ["héllo wörld, " * 7, "b" * 50, "the end"]


def test_text_packing_without_a_leading_bos_is_the_plain_cut():
    """No leading BOS (SmolLM2, the tiny models): consecutive `max_length` slices of the stream, all learned."""
    examples = build_examples([{"text": t} for t in TEXTS], TOK, "text", 32)
    stream = _byte_stream(TEXTS, TOK.eos_token_id)
    assert len(examples) == len(stream) // 32 > 2
    for i, e in enumerate(examples):
        assert e.input_ids == e.labels == stream[i * 32:(i + 1) * 32]


def test_packed_text_sequences_start_with_the_bos_never_learned():
    tok = _bos_tokenizer()
    examples = build_examples([{"text": t} for t in TEXTS], tok, "text", 32)
    stream = _byte_stream(TEXTS, tok.eos_token_id)
    assert len(examples) == len(stream) // 31 > 2
    for e in examples:
        assert len(e.input_ids) == 32 and e.input_ids[0] == tok.bos_token_id and e.labels[0] == IGNORE_INDEX
        assert e.labels[1:] == e.input_ids[1:] and tok.bos_token_id not in e.input_ids[1:]
    assert [t for e in examples for t in e.input_ids[1:]] == stream[:len(examples) * 31]
    with pytest.raises(QbaraError, match="max_length=1 leaves no room"):
        build_examples([{"text": "abc"}], tok, "text", 1)


def test_instruction_example_starts_with_one_unlearned_bos():
    """A named format renders no BOS: it is prepended to the alpaca prompt, masked; the rest is as without one."""
    tok = _bos_tokenizer()
    record = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
    (example,) = build_examples([record], tok, "instruction", 1024, template="alpaca")
    prompt = [tok.bos_token_id, *ALPACA_PROMPT.format("Add 2 and 3.").encode()]
    answer = [*b"5", tok.eos_token_id]
    assert example.input_ids == prompt + answer
    assert example.labels == [IGNORE_INDEX] * len(prompt) + answer
    (cut,) = build_examples([record], tok, "instruction", len(prompt) + 1, template="alpaca")
    assert cut.truncated and cut.input_ids == prompt + answer[:1]  # the cut keeps the BOS


def test_a_template_that_renders_the_bos_gives_it_once():
    """A chat template opening with {{ bos_token }} (Gemma's): the rendered <bos> is the BOS id, not prepended
    again; the ids equal those of the same template without it, where the BOS is prepended."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]
    renders = build_examples([{"messages": messages}], _bos_tokenizer("{{ bos_token }}" + CHATML_TEMPLATE),
                             "chat", 1024)[0]
    prepended = build_examples([{"messages": messages}], _bos_tokenizer(), "chat", 1024)[0]
    tok = _bos_tokenizer()
    plain = build_examples([{"messages": messages}], TOK, "chat", 1024)[0]  # no leading BOS: unchanged
    assert plain.input_ids == TOK(TOK.apply_chat_template(messages, tokenize=False), add_special_tokens=False).input_ids
    assert renders.input_ids == prepended.input_ids == [tok.bos_token_id, *plain.input_ids]
    assert renders.labels == prepended.labels == [IGNORE_INDEX, *plain.labels]
    assert renders.input_ids.count(tok.bos_token_id) == 1


@pytest.mark.models
@pytest.mark.skipif(not (cache_root() / GEMMA3_270M.cache_name / "tokenizer.json").is_file(),
                    reason="gemma3-270m is not converted into the qbara cache (load it once: qbara needs it)")
def test_gemma3_examples_start_with_its_single_bos():
    """Gemma 3 270M's tokenizer: the gemma format renders <bos> as its BOS id, alpaca gets it prepended; once."""
    tok = load_tokenizer(cache_root() / GEMMA3_270M.cache_name)
    bos = leading_bos(tok)
    assert bos == tok.bos_token_id is not None
    record = {"instruction": "Add 2 and 3.", "output": "5"}
    for template in ("gemma", "alpaca"):
        (example,) = build_examples([record], tok, "instruction", 256, template=template)
        assert example.input_ids[0] == bos and example.input_ids.count(bos) == 1
        assert example.labels[0] == IGNORE_INDEX
    assert all(e.input_ids[0] == bos for e in build_examples([{"text": "to be or not " * 20}], tok, "text", 16))


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
