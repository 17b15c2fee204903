"""`qbara generate` (replies to prompts, streamed or as JSON) and `qbara chat` (an interactive conversation), on a
model name, an HF or quantized folder, a base with an adapter folder, or a GGUF file (`qbara.from_pretrained`).

Prompts are rendered with the tokenizer's chat template (an adapter's recorded template when it has one) unless
--raw; every argument and the prompt file are checked before the model loads."""
from __future__ import annotations

import dataclasses
import json
import sys

import torch
from tqdm.auto import tqdm

from qbara.commands.eval import add_quant_option, load_for_eval
from qbara.errors import QbaraError
from qbara.generation import (
    GenerationSettings,
    Prompt,
    Reply,
    chat_template,
    context_length,
    fit_conversation,
    make_generator,
    prompt_ids,
    read_prompts,
    stop_ids,
    stream,
)

__all__ = ["add_parser"]


def _settings_of(args) -> GenerationSettings:
    """The generation settings of the command line (each bad value one QbaraError naming its flag)."""
    try:
        return GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    except QbaraError as err:
        raise QbaraError(f"--{err}") from None


def _device_of(args) -> str:
    """The device --device names (auto: cuda when torch sees a GPU); cuda without one is refused."""
    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise QbaraError("--device cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is False); use "
                         "--device cpu, or install a CUDA build of torch")
    return args.device


def _prompts_of(args) -> list[Prompt]:
    """The prompts of --prompt or --file (exactly one of them), as plain text with --raw."""
    if (args.prompt is None) == (args.file is None):
        raise QbaraError("give the prompt as --prompt TEXT or --file FILE (one prompt a line, or .jsonl records); "
                         + ("not both" if args.prompt is not None else "neither was given"))
    if args.raw and args.system:
        raise QbaraError("--system needs the chat template, and --raw feeds the prompt without it; drop one")
    prompts = [Prompt.user(args.prompt, args.system)] if args.prompt is not None else \
        read_prompts(args.file, args.system)
    if args.raw:
        prompts = [p if p.messages is None else Prompt(text=p.label, label=p.label) for p in prompts]
    return prompts


class _Session:
    """A loaded model with its tokenizer, template, stop tokens, context and random stream."""

    def __init__(self, args, settings: GenerationSettings):
        self.model, self.tokenizer = load_for_eval(args.model, args.adapter, args.quant)
        self.model.to(_device_of(args))
        self.template = chat_template(self.tokenizer)
        self.stop = stop_ids(self.model, self.tokenizer, self.template)
        self.context = context_length(self.model, self.tokenizer)
        self.settings, self.generator = settings, make_generator(settings)

    def check_fits(self, ids: list[int], what: str) -> None:
        if len(ids) >= self.context:
            raise QbaraError(f"{what} has {len(ids):,} tokens, but the model's context is {self.context:,}; "
                             f"shorten it")

    def reply(self, ids: list[int], reply: Reply):
        """The reply's text pieces, its length capped where the context ends."""
        room = min(self.settings.max_new_tokens, self.context - len(ids))
        settings = dataclasses.replace(self.settings, max_new_tokens=room)
        return stream(self.model, self.tokenizer, ids, settings, self.stop, self.generator, reply)

    def show(self, ids: list[int], reply: Reply) -> None:
        """The reply streamed to stdout, a note on stderr when it was cut at its length limit."""
        for piece in self.reply(ids, reply):
            print(piece, end="", flush=True)
        print(flush=True)
        if reply.ended == "length":
            cut = "--max-new-tokens" if reply.tokens == self.settings.max_new_tokens else "the model's context"
            print(f"(cut at {reply.tokens} tokens: {cut})", file=sys.stderr, flush=True)


def _run_generate(args) -> None:
    settings, prompts = _settings_of(args), _prompts_of(args)  # before the model loads
    _device_of(args)
    try:
        _generate(args, _Session(args, settings), prompts)
    except KeyboardInterrupt:  # while loading or replying: end the reply's line; the CLI prints its one line (130)
        print(flush=True)
        raise


def _generate(args, session: _Session, prompts: list[Prompt]) -> None:
    prepared = []
    for number, prompt in enumerate(prompts, start=1):
        ids = prompt_ids(session.tokenizer, prompt, session.template)
        session.check_fits(ids, f"prompt {number}" if len(prompts) > 1 else "the prompt")
        prepared.append((prompt, ids))
    # --json prints each reply when it is done: a bar on stderr shows the progress over several prompts
    shown = tqdm(prepared, desc="prompts", unit="prompt", file=sys.stderr, disable=not args.json or len(prepared) < 2)
    for number, (prompt, ids) in enumerate(shown, start=1):
        reply = Reply()
        if args.json:
            for _ in session.reply(ids, reply):
                pass
            tqdm.write(json.dumps({"prompt": prompt.label, "output": reply.text, "tokens": reply.tokens,
                                   "prompt_tokens": len(ids), "ended": reply.ended}, ensure_ascii=False),
                       file=sys.stdout)  # above the bar
            continue
        if len(prepared) > 1:
            print(f"--- prompt {number}/{len(prepared)}: {_short(prompt.label)}", file=sys.stderr, flush=True)
        session.show(ids, reply)


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_CHAT_HELP = "/reset clears the conversation, /exit or Ctrl-D ends it, Ctrl-C stops a reply"


def _run_chat(args) -> None:
    settings = _settings_of(args)  # before the model loads
    _device_of(args)
    try:
        _converse(args, settings)
    except KeyboardInterrupt:  # while loading or at the prompt: end the line; the CLI prints its one line (130)
        print(flush=True)
        raise


def _converse(args, settings: GenerationSettings) -> None:
    """The REPL: load, then read a message, answer it, until /exit or EOF (Ctrl-C in a reply stops the reply)."""
    session = _Session(args, settings)
    if session.template is None:
        raise QbaraError(f"the tokenizer of {args.model!r} has no chat template, so a conversation cannot be "
                         f"rendered; use qbara generate --raw for plain-text prompts")
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    print(f"chatting with {args.model}" + (f" + {args.adapter}" if args.adapter else "")
          + f" ({_CHAT_HELP})", file=sys.stderr, flush=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(flush=True)
            return
        text = line.strip()
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            messages = list(start)
            print("(conversation cleared)", file=sys.stderr, flush=True)
            continue
        if not text:
            continue
        messages = _answer(session, messages + [{"role": "user", "content": line}])


def _answer(session: _Session, messages: list) -> list:
    """`messages` with the model's reply to its last user message appended (what was shown of it when Ctrl-C
    stopped it); the oldest turns dropped, with a note, when the conversation outgrows the context."""
    budget = max(session.context - session.settings.max_new_tokens, session.context // 2)
    messages, ids, dropped = fit_conversation(session.tokenizer, session.template, messages, budget)
    if dropped:
        print(f"(dropped the oldest {dropped} turn{'s' * (dropped > 1)} to fit the model's context of "
              f"{session.context:,} tokens)", file=sys.stderr, flush=True)
    if len(ids) >= session.context:
        print(f"(that message has {len(ids):,} tokens with the conversation, more than the model's context of "
              f"{session.context:,}; it was not sent)", file=sys.stderr, flush=True)
        return messages[:-1]
    reply = Reply()
    try:
        session.show(ids, reply)
    except KeyboardInterrupt:
        print(flush=True)
        print("(reply stopped)", file=sys.stderr, flush=True)
    return messages + [{"role": "assistant", "content": reply.text}]


def _common_options(p) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="model name (default smollm2-135m), HF folder, quantized folder (qbara quantize / merge "
                        "--into quantized) or .gguf file")
    p.add_argument("--adapter", help="adapter folder written by qbara train / save_adapter, or a PEFT LoRA folder")
    add_quant_option(p)
    p.add_argument("--system", metavar="TEXT", help="a system message put before the conversation")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="most tokens in one reply (default 256; also ends where the model's context does)")
    p.add_argument("--temperature", type=float, default=0.7, metavar="T",
                   help="sampling temperature (default 0.7); 0 is greedy: always the most likely token")
    p.add_argument("--top-p", type=float, default=0.9, metavar="P",
                   help="sample from the most likely tokens that together reach this probability, in (0, 1] "
                        "(default 0.9; 1 keeps every token)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the model runs: auto (default) is the GPU when torch sees one, else the CPU")
    p.add_argument("--seed", type=int, metavar="S", help="seed for sampling: the same seed gives the same replies "
                                                          "(default: a fresh one each run)")


def add_parser(subparsers) -> None:
    g = subparsers.add_parser("generate", help="replies to prompts, streamed (or --json)",
                              description="Replies to prompts, streamed as they are produced. Prompts are "
                                          "rendered with the tokenizer's chat template (an adapter's recorded "
                                          "one when it has one) unless --raw.")
    _common_options(g)
    g.add_argument("--prompt", metavar="TEXT", help="the prompt (the user message); or --file")
    g.add_argument("--file", metavar="FILE",
                   help="prompts: a .txt file (one a line, blank lines skipped) or .jsonl/.json/.csv records "
                        "(instruction: instruction + input; chat: messages up to the last user turn; text: as is)")
    g.add_argument("--raw", action="store_true",
                   help="feed the prompt as plain text, without the chat template (for base models)")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt {prompt, output, tokens, prompt_tokens, ended} instead "
                        "of streaming")
    g.set_defaults(func=_run_generate)
    c = subparsers.add_parser("chat", help="an interactive conversation with a model",
                              description=f"An interactive conversation in the tokenizer's chat template: "
                                          f"{_CHAT_HELP}; Ctrl-C at the prompt ends (exit 130).")
    _common_options(c)
    c.set_defaults(func=_run_chat)
