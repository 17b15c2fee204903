"""Training data: read JSON / JSONL / CSV / text files, turn records into token ids with the loss
masked on the prompt (labels = -100), rendered with the run's prompt format (data.template,
`qbara.prompt_formats`), or pack plain text into fixed-length sequences. Where the tokenizer puts a BOS before every
text (Gemma), every sequence starts with it, once, never learned, as the model was pretrained."""
from __future__ import annotations

import csv
import difflib
import functools
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from qbara.data.hf_datasets import is_saved_dataset, read_dataset
from qbara.data.special_tokens import leading_bos, with_bos
from qbara.errors import QbaraError
from qbara.prompt_formats import PromptFormat, instruction_messages, resolve_template
from qbara.templates import ChatTemplate
from qbara.validate import parse_json, read_text_file, short_repr

__all__ = ["Example", "IGNORE_INDEX", "PadCollator", "build_examples", "check_text", "detect_format", "optional_text",
           "read_records"]

IGNORE_INDEX = -100

@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False  # the record was cut at data.max_length


def read_records(path: str) -> list:
    """Records from a .json (list), .jsonl, .csv file or a folder written by datasets' save_to_disk; a .txt file
    gives one {"text": ...} record. `dataset:<path>[:split]` reads with Hugging Face datasets
    (`qbara.data.hf_datasets`). A leading byte-order mark is not part of the text and is dropped."""
    if str(path).startswith("dataset:"):
        return read_dataset(str(path)[len("dataset:"):])
    p = Path(path)
    if not p.exists():
        raise QbaraError(f"data file {path!r} not found; check data.train / data.eval")
    if p.is_dir():
        if is_saved_dataset(p):
            return read_dataset(str(p))
        raise QbaraError(f"{path} is a folder, not a data file; pass a .jsonl, .json, .csv or .txt file, or a "
                         f"dataset as dataset:PATH (a folder written by save_to_disk, or a folder of data files)")

    suffix = p.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv", ".txt", ".md", ""):
        raise QbaraError(f"{path}: unsupported data file type {suffix!r}; use .jsonl, .json, .csv or .txt")
    # a regular UTF-8 text file: not binary, not /dev/zero
    text = read_text_file(p, "data file", max_bytes=None).removeprefix(_BOM)
    if suffix == ".jsonl":
        return _jsonl_records(text)
    if suffix == ".json":
        try:
            data = parse_json(text, str(path))
        except QbaraError as err:
            raise QbaraError(f"{err}; fix the file or use JSONL") from None
        if not isinstance(data, list):
            raise QbaraError(f"{path}: expected a JSON list of records")
        return data
    if suffix == ".csv":
        return _csv_records(text, path)
    return [{"text": text}]


_BOM = "\ufeff"


def _jsonl_records(text: str) -> list:
    """One record a line; a line that is not JSON becomes a _Malformed record (failed or skipped by
    build_examples). Lines end at \\n only: U+2028 and other Unicode line breaks may sit inside a JSON string."""
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                records.append(parse_json(line, f"line {number}"))
            except QbaraError as err:
                records.append(_Malformed(str(err).replace(f"line {number}: ", f"line {number} is ", 1)))
    return records


def _csv_records(text: str, path) -> list:
    """Rows of a CSV file as dicts keyed by its header. A header naming a column twice is refused (one value
    would silently win); a row with more or fewer cells than the header is a _Malformed record."""
    try:
        rows = csv.reader(io.StringIO(text, newline=""))
        header = next(rows, None)
        if header is None:
            return []
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise QbaraError(f"{path}: the CSV header names column(s) {', '.join(map(repr, repeated))} more than "
                             f"once; give each column its own name")
        records = []
        for row in rows:
            if not row:
                continue  # a blank line
            if len(row) != len(header):
                records.append(_Malformed(f"(CSV line {rows.line_num}) has {len(row)} cells but the header has "
                                          f"{len(header)}"))
            else:
                records.append(dict(zip(header, row)))
        return records
    except csv.Error as err:
        raise QbaraError(f"{path}: not valid CSV ({err}); fix the file") from None


class _Malformed:
    def __init__(self, reason: str):
        self.reason = reason


def detect_format(records: list) -> str:
    for record in records:
        if isinstance(record, dict):
            if "messages" in record:
                return "chat"
            if "instruction" in record or "output" in record:
                return "instruction"
            if "text" in record:
                return "text"
    raise QbaraError("cannot tell the data format: records need instruction/output, messages, or text keys "
                     "(or set data.format)")


def check_text(value, what: str) -> str:
    """`value` if it is text a tokenizer can take, else ValueError naming `what`: a string (not a number, list or
    null), without a lone UTF-16 surrogate (an unpaired \\ud800-style JSON escape: not a character, tokenizers
    refuse it) and without NUL characters (text holds none; a zeroed block of a damaged file does)."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__} {short_repr(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{what} holds a lone surrogate U+{ord(value[err.start]):04X} at character {err.start}, "
                         f"which is not text (an unpaired \\uXXXX escape)") from None
    if "\x00" in value:
        raise ValueError(f"{what} holds a NUL character (U+0000) at character {value.index(chr(0))}; text holds "
                         f"none, the data is damaged")
    return value


def _instruction_example(record: dict, tokenizer, max_length: int, template: ChatTemplate) -> Example:
    """An instruction record as the conversation `instruction_messages` builds, rendered with `template`."""
    if "instruction" not in record or "output" not in record:
        raise ValueError("needs string 'instruction' and 'output' fields")
    instruction = check_text(record["instruction"], "field 'instruction'")
    output = check_text(record["output"], "field 'output'")
    extra, system = (optional_text(record, name) for name in ("input", "system"))
    return _rendered_example(instruction_messages(instruction, output, extra, system), tokenizer, max_length,
                             template)


def optional_text(record: dict, name: str) -> str:
    """The record's field `name` as text; null or absent is empty."""
    value = record.get(name)
    return "" if value is None else check_text(value, f"field {name!r}")


def check_messages(messages) -> None:
    """Refuse, before any rendering, a conversation the template could not take: a list of {role, content}
    whose role is a non-empty string and whose content is text."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise ValueError("'messages' must be a list of {role, content}")
    for number, message in enumerate(messages, start=1):
        if not check_text(message["role"], f"message {number}'s 'role'"):
            raise ValueError(f"message {number}'s 'role' is empty (roles are user, assistant, system...)")
        check_text(message["content"], f"message {number}'s 'content'")


def _chat_example(record: dict, tokenizer, max_length: int, template: ChatTemplate) -> Example:
    messages = record.get("messages")
    check_messages(messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("has no assistant message to learn")
    return _rendered_example(messages, tokenizer, max_length, template)


def _rendered_example(messages: list, tokenizer, max_length: int, template: ChatTemplate) -> Example:
    """The conversation rendered with `template`, loss on what each assistant turn adds after its generation
    prompt. The text is tokenized piece by piece (prompt, answer, prompt, ...), so the tokens before the first
    answer are exactly `tokenizer(render(messages before it, add_generation_prompt=True), add_special_tokens=False)`
    (what inference feeds the model), whatever the tokenizer would merge across the prompt / answer boundary; before
    a later answer they are wherever the turns start with a special token (as in every named format). The
    tokenizer's leading BOS opens the ids once (`with_bos`: a template that renders it, as Gemma's, gave it)."""
    full = template.render(messages)
    cuts, answers = [0], []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = template.render(messages[:i], add_generation_prompt=True)
        upto = template.render(messages[: i + 1])
        if not full.startswith(upto) or not upto.startswith(prefix) or len(prefix) < cuts[-1]:
            raise ValueError("the chat template does not render conversations prefix-consistently")
        cuts += [len(prefix), len(upto)]
        answers.append(len(cuts) - 2)  # the piece full[len(prefix):len(upto)]
    cuts.append(len(full))
    ids, labels = [], []
    for piece, (start, end) in enumerate(zip(cuts, cuts[1:])):
        tokens = tokenizer(full[start:end], add_special_tokens=False).input_ids if end > start else []
        ids += tokens
        labels += tokens if piece in answers else [IGNORE_INDEX] * len(tokens)
    bos = leading_bos(tokenizer)
    if bos is not None:
        led = with_bos(ids, bos)
        ids, labels = led, [IGNORE_INDEX] * (len(led) - len(ids)) + labels
        labels[0] = IGNORE_INDEX  # an input, never learned, even where a template renders it in an answer
    return Example(ids[:max_length], labels[:max_length], truncated=len(ids) > max_length)


_FIELDS = {"instruction": ("instruction", "input", "output", "system"), "chat": ("messages",), "text": ("text",)}


def _warn_misspelled_fields(records: list, known: tuple, source: str) -> None:
    """A notice for each field the format does not read whose name is close to one it does ('INPUT', 'inptu',
    or two JSONL lines merged by a lost newline): its values are silently left out of every example. Other
    extra fields (an id, a category) are common and pass without a word."""
    names = {key for record in records if isinstance(record, dict) for key in record if isinstance(key, str)}
    for name in sorted(names - set(known)):
        close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.75)
        if close:
            warnings.warn(f"{source}: field {name!r} is not read (the fields read are {', '.join(known)}); did "
                          f"you mean {close[0]!r}? Rename it, or the values are left out of every example")


def build_examples(records: list, tokenizer, fmt: str, max_length: int, on_error: str = "fail",
                   source: str = "data", template: PromptFormat | str = "auto") -> list[Example]:
    """Tokenized examples; a malformed record fails (naming its number) or is skipped with a warning.
    Instruction and chat records are rendered with `template` (a PromptFormat, or a data.template value resolved
    for `tokenizer` by `qbara.prompt_formats.resolve_template`); text is packed without one."""
    if fmt == "auto":
        fmt = detect_format(records)
    _warn_misspelled_fields(records, _FIELDS.get(fmt, ()), source)
    if fmt == "text":
        return _pack_text(records, tokenizer, max_length, source)
    if isinstance(template, str):  # compiled once for all records, in the bounded sandbox (qbara.templates)
        template = resolve_template(template, tokenizer)
    make = functools.partial(_instruction_example if fmt == "instruction" else _chat_example,
                             template=template.template)
    examples, skipped = [], []
    for number, record in enumerate(records, start=1):
        try:
            if isinstance(record, _Malformed):
                raise ValueError(record.reason)
            if not isinstance(record, dict):
                raise ValueError("is not a JSON object")
            example = make(record, tokenizer, max_length)
            if all(label == IGNORE_INDEX for label in example.labels):
                raise ValueError(f"has no answer tokens within data.max_length={max_length}")
            examples.append(example)
        except QbaraError:  # about the whole run (e.g. the chat template), not this record
            raise
        except ValueError as err:
            if on_error == "fail":
                raise QbaraError(f"{source}: record {number} {err}; fix it or set data.on_error=skip") from None
            skipped.append(number)
    if skipped:
        warnings.warn(f"{source}: skipped {len(skipped)} malformed records (numbers {skipped[:10]}...)")
    if not examples:
        raise QbaraError(f"{source}: no usable records")
    return examples


def _pack_text(records: list, tokenizer, max_length: int, source: str = "data") -> list[Example]:
    """Concatenate texts (separated by EOS) and cut into sequences of `max_length` tokens; where the tokenizer
    puts a BOS before every text, each sequence is that BOS (not learned) and the next `max_length` - 1 tokens."""
    ids: list[int] = []
    for number, record in enumerate(records, start=1):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise QbaraError(f"{source}: record {number} has no string 'text' field")
        try:
            check_text(text, "field 'text'")
        except ValueError as err:
            raise QbaraError(f"{source}: record {number} {err}; fix it") from None
        ids += tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    bos = leading_bos(tokenizer)
    lead = [] if bos is None else [bos]
    step = max_length - len(lead)  # text tokens a sequence holds
    if step < 1:
        raise QbaraError(f"data.max_length={max_length} leaves no room for text after the tokenizer's BOS; set it "
                         f"to 2 or more")
    n = len(ids) // step
    if n == 0:
        raise QbaraError(f"{source}: {len(ids)} tokens is less than one sequence of data.max_length={max_length}"
                         + (f" (the BOS and {step} text tokens)" if lead else ""))
    chunks = [ids[i * step:(i + 1) * step] for i in range(n)]
    return [Example(lead + chunk, [IGNORE_INDEX] * len(lead) + chunk) for chunk in chunks]


class ExampleDataset(torch.utils.data.Dataset):
    """Examples for the Trainer; `chat_template` is the Jinja text their prompts were rendered with (None for
    packed text), which the adapter records."""

    def __init__(self, examples: list[Example], chat_template: str | None = None):
        self.examples, self.chat_template = examples, chat_template

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        e = self.examples[i]
        return {"input_ids": e.input_ids, "labels": e.labels}


class PadCollator:
    """Right-pads a batch; padded positions get attention 0 and label -100."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[row, :n] = torch.tensor(b["input_ids"])
            labels[row, :n] = torch.tensor(b["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
