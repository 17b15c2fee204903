"""Benchmark: does llama.cpp prompt a qbara fine-tune the way it was trained? (issue #27)

Per case, a real fine-tune on instruction records (QA-HiRA rank 8 on an INT4 G32 base, --steps AdamW steps,
`data.template` as the case says) is exported with `qbara export --format gguf` (folded exactly into Q4_1). Then
llama.cpp (llama-cpp-python, vocab only) reads the GGUF and builds the prompts of the training conversations
from the chat template embedded in the file, two ways:
  jinja   llama-cpp-python's Jinja2ChatFormatter (what `Llama.create_chat_completion` uses for a GGUF with a
          chat template), tokenized by llama.cpp (`Llama.tokenize(..., add_bos=False, special=True)`, as that
          path does);
  native  llama.cpp's built-in formatter `llama_chat_apply_template` (llama-cli / llama-server without
          --jinja), which recognises known template families by their markers and renders its own C++ copy;
          a template it does not recognise is reported as such. Its text is tokenized as llama-cli does, with
          the vocab's own BOS rule (Gemma: BOS first), and compared with that BOS in front.
Each prompt (the conversation up to an assistant turn, with the generation prompt) must equal the training
sequence's tokens before that turn, token for token, and the whole conversation the training sequence. The
conversations are the training records (single turn, with and without input, one with a system field) and
multi-turn chat records rendered by training's chat path with the recorded template.
Control: the alpaca fine-tune's conversations prompted with the base model's own embedded template (what the
GGUF carried before issue #27) must NOT match.

The llama.cpp side runs in the llama-cpp-python interpreter (--llama-python) as `chat_template_llamacpp.py
--worker JOB.json`; this file imports only the standard library at top level.

    nice -n 10 python3 bench/chat_template_llamacpp.py [--steps 2] [--skip-gemma] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA_PYTHON = "/work/llama-venv/bin/python"
HERE = Path(__file__).resolve()
IGNORE_INDEX = -100

RECORDS = [
    {"instruction": "Name the capital of France.", "output": "Paris."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour."},
    {"instruction": "Give a synonym.", "input": "happy", "output": "Glad."},
    {"system": "You answer in one word.", "instruction": "What colour is the sky?", "output": "Blue."},
    {"instruction": "Count to three.", "output": "One, two, three."},
]
CHATS = [
    {"messages": [{"role": "user", "content": "Hi! Who wrote Hamlet?"},
                  {"role": "assistant", "content": "William Shakespeare."},
                  {"role": "user", "content": "And when?"},
                  {"role": "assistant", "content": "Around 1600."}]},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "2 + 2?"},
                  {"role": "assistant", "content": "4."},
                  {"role": "user", "content": "Times 10?"},
                  {"role": "assistant", "content": "40."}]},
]
# A Jinja file (data.template: PATH) in a format no named template covers: Vicuna-style turns.
VICUNA_STYLE = ("{%- for m in messages -%}{%- if m['role'] == 'system' -%}{{ m['content'] + '\\n\\n' }}"
                "{%- elif m['role'] == 'user' -%}{{ 'USER: ' + m['content'] + '\\n' }}"
                "{%- else -%}{{ 'ASSISTANT: ' + m['content'] + eos_token + '\\n' }}{%- endif -%}{%- endfor -%}"
                "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}")
CASES = [  # name, model, data.template
    ("smollm2 auto (its ChatML)", "smollm2-135m", "auto"),
    ("smollm2 alpaca", "smollm2-135m", "alpaca"),
    ("smollm2 Jinja file", "smollm2-135m", "FILE"),
    ("gemma3 gemma", "gemma3-270m", "gemma"),
]


# ======================================================================================= llama.cpp side
def worker(job_path: str) -> None:
    """Render and tokenize each conversation of JOB.json with the template embedded in the GGUF (or `template`)."""
    import ctypes

    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    job = json.loads(Path(job_path).read_text())
    llm = llama_cpp.Llama(job["gguf"], vocab_only=True, verbose=False)
    embedded = llm.metadata.get("tokenizer.chat_template")
    template = job.get("template") or embedded
    bos = llm.detokenize([llm.token_bos()], special=True).decode()
    eos = llm.detokenize([llm.token_eos()], special=True).decode()

    def tokens(text: str, add_bos: bool = False) -> list[int]:
        return llm.tokenize(text.encode(), add_bos=add_bos, special=True)

    # llama-cli tokenizes the built-in formatter's text with the vocab's own BOS rule (Gemma: a BOS first),
    # llama-cpp-python's Jinja path without one (the template writes it)
    adds_bos = len(tokens("x", add_bos=True)) > len(tokens("x"))

    def jinja(messages: list, generation_prompt: bool) -> str:
        formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos,
                                        add_generation_prompt=generation_prompt)
        return formatter(messages=messages).prompt

    def native(messages: list, generation_prompt: bool):
        chat = (llama_cpp.llama_chat_message * len(messages))()
        keep = []
        for slot, message in zip(chat, messages):
            role, content = message["role"].encode(), message["content"].encode()
            keep += [role, content]
            slot.role, slot.content = role, content
        size = 1 << 16
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(messages), generation_prompt, buf, size)
        return None if n < 0 else (bos if adds_bos else "") + buf.raw[:n].decode()

    out = []
    for conv in job["conversations"]:
        row = {"tokenizer_prompt": tokens(conv["expected_prompt_text"])}  # llama.cpp's tokens of training's text
        for part, generation_prompt in (("prompt", True), ("full", False)):
            messages = conv[f"{part}_messages"]
            for kind, render in (("jinja", jinja), ("native", native)):
                text = render(messages, generation_prompt) if messages else None
                row[f"{kind}_{part}_text"] = text
                row[f"{kind}_{part}"] = tokens(text) if text is not None else None
        out.append(row)
    Path(job["result"]).write_text(json.dumps({"embedded_template": embedded, "bos": bos, "eos": eos,
                                               "conversations": out}))


# ======================================================================================= qbara side
def turns(example) -> list[int]:
    """Positions where an assistant turn starts (a label after a masked one)."""
    labels = example.labels
    return [i for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX]


def conversations(examples, conversations_messages, template) -> list[dict]:
    """For every assistant turn of every example: the messages before it, the expected prompt ids (the training
    tokens before the turn) and text (`template`, a qbara ChatTemplate, rendering them with the generation
    prompt); for the last turn also the whole conversation, its ids and text."""
    out = []
    for example, messages in zip(examples, conversations_messages):
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        starts = turns(example)
        assert len(starts) == len(assistant), (starts, assistant)
        for k, (at, start) in enumerate(zip(assistant, starts)):
            last = k == len(assistant) - 1
            full = last and not example.truncated
            out.append({"prompt_messages": messages[:at], "expected_prompt": example.input_ids[:start],
                        "expected_prompt_text": template.render(messages[:at], add_generation_prompt=True),
                        "full_messages": messages if full else None,
                        "expected_full": example.input_ids if full else None,
                        "expected_full_text": template.render(messages) if full else None})
    return out


def run_case(name: str, model: str, template: str, args, work: Path) -> dict:
    from qbara.cli import main as qbara_main
    from qbara.models.loader import load_model_tokenizer
    from qbara.prompt_formats import instruction_messages, resolve_template
    from qbara.train.config import build_config
    from qbara.train.data import build_examples
    from qbara.train.trainer import load_datasets, train

    case = work / name.replace(" ", "_").replace("(", "").replace(")", "")
    case.mkdir()
    data = case / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    if template == "FILE":
        template = str(case / "vicuna_style.jinja")
        Path(template).write_text(VICUNA_STYLE)
    config = build_config({
        "model": {"name": model}, "quant": {"format": "int4", "block_size": 32},
        "adapter": {"method": "qahira", "rank": 8, "alpha": 16},
        "data": {"train": str(data), "template": template, "max_length": 256},
        "train": {"output_dir": str(case / "run"), "steps": args.steps, "batch_size": 2, "lr": 1e-4,
                  "save_steps": 1000, "logging_steps": 1, "progress": False}})
    start = time.perf_counter()
    result = train(config)
    gguf = case / "model.gguf"
    assert qbara_main(["export", "--model", model, "--adapter", str(result.adapter_dir), "--format", "gguf",
                       "--out", str(gguf)]) == 0
    seconds = time.perf_counter() - start
    recorded = (result.adapter_dir / "chat_template.jinja").read_text()

    tokenizer = load_model_tokenizer(model)
    base_template = tokenizer.chat_template
    train_set, _ = load_datasets(config, tokenizer)  # the training sequences, as the run built them
    messages = [instruction_messages(r["instruction"], r["output"], r.get("input", ""), r.get("system", ""))
                for r in RECORDS]
    recorded_format = resolve_template(str(result.adapter_dir / "chat_template.jinja"), tokenizer)
    convs = conversations(train_set.examples, messages, recorded_format.template)
    chat_examples = build_examples(CHATS, tokenizer, "chat", 512, template=recorded_format)
    convs += conversations(chat_examples, [c["messages"] for c in CHATS], recorded_format.template)

    llama = llama_side(args, case, gguf, convs)
    row = {"case": name, "model": model, "template": template if template in ("auto", "alpaca", "gemma") else
           "Jinja file", "seconds_train_export": round(seconds, 1), "gguf_bytes": gguf.stat().st_size,
           "embedded_equals_recorded": llama["embedded_template"] == recorded,
           "prompts": len(convs), **score(convs, llama["conversations"])}
    if base_template and base_template != recorded:  # control: the base's own template prompts otherwise
        control = llama_side(args, case, gguf, convs, template=base_template, tag="control")
        row["control_base_template_prompts_equal"] = score(convs, control["conversations"])["jinja_prompt_text_equal"]
    return row


def llama_side(args, case: Path, gguf: Path, convs: list, template: str | None = None, tag: str = "job") -> dict:
    job = {"gguf": str(gguf), "template": template, "conversations": convs, "result": str(case / f"{tag}.out.json")}
    (case / f"{tag}.json").write_text(json.dumps(job))
    subprocess.run([args.llama_python, str(HERE), "--worker", str(case / f"{tag}.json")], check=True)
    return json.loads((case / f"{tag}.out.json").read_text())


def score(convs: list, got: list) -> dict:
    """How many prompts / whole conversations llama.cpp renders (text) and tokenizes (ids) exactly as training
    did, per formatter; and how many training prompt texts llama.cpp's tokenizer alone turns into the training ids
    (the tokenizers' own agreement, a floor for the ids columns)."""
    def equal(kind: str, part: str, what: str) -> int | None:
        key = f"{kind}_{part}" + ("_text" if what == "text" else "")
        pairs = [(c[f"expected_{part}" + ("_text" if what == "text" else "")], g[key]) for c, g in zip(convs, got)
                 if part == "prompt" or c["full_messages"] is not None]
        if any(g is None for _, g in pairs):
            return None  # llama.cpp's built-in formatter does not recognise the template
        return sum(e == g for e, g in pairs)

    row = {f"{kind}_{part}_{what}_equal": equal(kind, part, what) for kind in ("jinja", "native")
           for part in ("prompt", "full") for what in ("text", "ids")}
    row["tokenizer_prompt_ids_equal"] = sum(c["expected_prompt"] == g["tokenizer_prompt"] for c, g in zip(convs, got))
    row["full_conversations"] = sum(c["full_messages"] is not None for c in convs)
    row["tokenizer_differs_on"] = [c["expected_prompt_text"][-60:] for c, g in zip(convs, got)
                                   if c["expected_prompt"] != g["tokenizer_prompt"]]
    return row


def markdown(rows: list, meta: dict) -> str:
    def frac(row, key, total):
        value = row.get(key)
        return "-" if key not in row else "not recognised" if value is None else f"{value}/{total}"

    lines = [
        "# llama.cpp prompts qbara fine-tunes as they were trained (issue #27)", "",
        f"{meta['date']}, llama-cpp-python {meta['llama_cpp']}, {meta['steps']} training steps per case; "
        f"`{meta['command']}`.", "",
        "Each row: a fine-tune (QA-HiRA r8 on INT4 G32, 6 instruction records, `data.template` as named) exported "
        "to GGUF (Q4_1). llama.cpp reads the chat template embedded in the file and builds the prompt of every "
        "assistant turn of the training conversations (6 instruction records and 2 two-turn chats: 10 prompts) and "
        "each whole conversation (8). text = the same characters as training rendered; ids = the same token ids as "
        "the training sequence. tokenizer = llama.cpp's tokenizer on training's own prompt text (no template "
        "involved): where it differs from the HF tokenizer, the ids columns cannot be better.", "",
        "| case | embedded = recorded | Jinja (llama-cpp-python, llama-server --jinja): prompts text / ids | whole "
        "text / ids | built-in formatter (llama-cli, llama-server): prompts text / ids | whole text / ids | "
        "tokenizer | control: base's template, prompt text | train + export |",
        "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n, f = r["prompts"], r["full_conversations"]
        lines.append(
            f"| {r['case']} | {'yes' if r['embedded_equals_recorded'] else 'NO'} | "
            f"{frac(r, 'jinja_prompt_text_equal', n)} / {frac(r, 'jinja_prompt_ids_equal', n)} | "
            f"{frac(r, 'jinja_full_text_equal', f)} / {frac(r, 'jinja_full_ids_equal', f)} | "
            f"{frac(r, 'native_prompt_text_equal', n)} / {frac(r, 'native_prompt_ids_equal', n)} | "
            f"{frac(r, 'native_full_text_equal', f)} / {frac(r, 'native_full_ids_equal', f)} | "
            f"{r['tokenizer_prompt_ids_equal']}/{n} | {frac(r, 'control_base_template_prompts_equal', n)} | "
            f"{r['seconds_train_export']:.0f} s |")
    differs = sorted({t for r in rows for t in r["tokenizer_differs_on"]})
    lines += ["", "`not recognised`: llama.cpp's built-in C++ formatter knows template families by their markers "
              "and renders its own copy of them; a template it does not know is refused (then llama-server needs "
              "`--jinja`). One it mistakes for a family it knows is rendered in that family's format."]
    if differs:
        lines += ["", "Prompts where llama.cpp's tokenizer alone splits training's text otherwise than the HF "
                  "tokenizer (end of the prompt shown): " + "; ".join(f"`{json.dumps(t)[1:-1]}`" for t in differs)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=2, help="training steps per case")
    parser.add_argument("--skip-gemma", action="store_true", help="leave out the Gemma 3 270M case")
    parser.add_argument("--llama-python", default=LLAMA_PYTHON, help="interpreter with llama_cpp installed")
    parser.add_argument("--out", default=str(HERE.parent / "results"), help="folder for the results")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qbara-chat-template-") as tmp:
        for name, model, template in CASES:
            if args.skip_gemma and model.startswith("gemma"):
                continue
            rows.append(run_case(name, model, template, args, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    version = subprocess.run([args.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    meta = {"date": time.strftime("%Y-%m-%d"), "llama_cpp": version, "steps": args.steps,
            "command": "python3 bench/chat_template_llamacpp.py " + " ".join(sys.argv[1:])}
    out = Path(args.out)
    (out / "chat_template_llamacpp.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / "chat_template_llamacpp.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
