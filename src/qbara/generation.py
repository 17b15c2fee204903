"""Text generation for trying a model: chat-template prompts, greedy or top-p sampling on a KV cache, text
streamed in whole characters, stopping at EOS or the template's end-of-turn token."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qbara.data.special_tokens import leading_bos, with_bos
from qbara.errors import QbaraError
from qbara.prompt_formats import instruction_messages
from qbara.templates import ChatTemplate
from qbara.train.data import check_messages, check_text, detect_format, optional_text, read_records
from qbara.validate import read_text_file


@dataclass(frozen=True)
class GenerationSettings:
    """How a reply is drawn: temperature 0 is greedy, else top-p sampling; seed None draws a fresh seed."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise QbaraError(f"max-new-tokens must be a whole number of at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # also refuses NaN
            raise QbaraError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise QbaraError(f"top-p must be in (0, 1] (1 keeps every token), got {self.top_p}")


@dataclass
class Prompt:
    """One prompt: a conversation for the chat template (`messages`), or plain `text` fed as it is."""

    messages: list | None = None
    text: str | None = None
    label: str = field(default="")  # what --json prints as the prompt

    @classmethod
    def user(cls, text: str, system: str | None = None) -> Prompt:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return cls(messages=messages, label=text)


def read_prompts(path: str, system: str | None = None) -> list[Prompt]:
    """The prompts of a file: .txt gives one user prompt a line; records (as `read_records` reads) give what
    training renders before the answer, text records their plain text."""
    p = Path(path)
    if not p.exists() and not str(path).startswith("dataset:"):
        raise QbaraError(f"prompt file {path!r} not found; check --file")
    if p.is_file() and p.suffix.lower() in (".txt", ".md", ""):
        lines = [line.strip() for line in read_text_file(p, "prompt file", max_bytes=None).splitlines()]
        prompts = [Prompt.user(line, system) for line in lines if line]
    else:
        records = read_records(path)
        fmt = detect_format(records) if records else "text"
        prompts = []
        for number, record in enumerate(records, start=1):
            try:
                prompts.append(_record_prompt(record, fmt, system))
            except ValueError as err:
                raise QbaraError(f"{path}: record {number} {err}; fix it or remove it") from None
    if not prompts:
        raise QbaraError(f"{path}: no prompts in the file; write one prompt a line (.txt) or records (.jsonl)")
    return prompts


def _record_prompt(record, fmt: str, system: str | None) -> Prompt:
    """One record's prompt, as training renders it up to its answer (its own system wins over `system`)."""
    if not isinstance(record, dict):
        raise ValueError(getattr(record, "reason", "is not a JSON object"))
    if fmt == "instruction":  # the conversation training builds (qbara.prompt_formats), up to its answer
        instruction = check_text(record.get("instruction"), "field 'instruction'")
        extra, own = (optional_text(record, name) for name in ("input", "system"))
        messages = instruction_messages(instruction, "", extra, own or system)[:-1]
        return Prompt(messages=messages, label=messages[-1]["content"])
    if fmt == "chat":
        messages = record.get("messages")
        check_messages(messages)
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise ValueError("has no user message to answer")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages[: users[-1] + 1]]
        if system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        return Prompt(messages=messages, label=messages[-1]["content"])
    text = check_text(record.get("text"), "field 'text'")
    return Prompt(text=text, label=text)


def chat_template(tokenizer) -> ChatTemplate | None:
    """The tokenizer's chat template compiled in the bounded sandbox, or None when it has none."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    return ChatTemplate.of(tokenizer)


def prompt_ids(tokenizer, prompt: Prompt, template: ChatTemplate | None) -> list[int]:
    """Token ids of `prompt`: messages rendered by `template` (no special tokens added but the tokenizer's leading
    BOS, once, as training renders them), or plain text tokenized."""
    if prompt.messages is None:
        return tokenizer(prompt.text).input_ids
    if template is None:
        if len(prompt.messages) > 1:
            raise QbaraError(f"the tokenizer from {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template, "
                             f"so a system prompt or a conversation cannot be rendered; drop --system, or use a "
                             f"model with a chat template")
        return tokenizer(prompt.messages[0]["content"]).input_ids
    text = template.render(prompt.messages, add_generation_prompt=True)
    return with_bos(tokenizer(text, add_special_tokens=False).input_ids, leading_bos(tokenizer))


def stop_ids(model, tokenizer, template: ChatTemplate | None) -> set[int]:
    """The tokens that end a reply: the tokenizer's and the model's EOS, and the template's end-of-turn token."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                   getattr(model.config, "eos_token_id", None), end_of_turn_id(tokenizer, template)):
        ids.update(source if isinstance(source, (list, tuple)) else [source] if source is not None else [])
    return ids


_MARK = "qbaraENDofTURNmark"


def end_of_turn_id(tokenizer, template: ChatTemplate | None) -> int | None:
    """The special token the template writes right after an assistant message (<|im_end|>, ...), or None."""
    if template is None:
        return None
    text = template.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}])
    if _MARK not in text:
        return None
    after = text[text.index(_MARK) + len(_MARK):]
    ids = tokenizer(after, add_special_tokens=False).input_ids
    added = getattr(tokenizer, "added_tokens_decoder", {})
    if ids and (ids[0] in tokenizer.all_special_ids or getattr(added.get(ids[0]), "special", False)):
        return ids[0]
    return None


def context_length(model, tokenizer) -> int:
    """The most tokens the model attends to (its position limit), capped by the tokenizer's limit when set."""
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 1 << 30]
    return min(limits) if limits else 1 << 30


def _pick(logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator) -> int:
    """The next token: the most likely (temperature 0), else a draw from the top-p nucleus at the temperature."""
    if settings.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / settings.temperature, dim=-1)
    return int(torch.multinomial(nucleus(probs, settings.top_p), 1, generator=generator))


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`probs` kept on the smallest set of top tokens reaching `top_p` (at least one), zero elsewhere, renormalized."""
    ordered, order = torch.sort(probs, descending=True)
    before = torch.cumsum(ordered, dim=-1) - ordered  # the mass of the tokens more likely than each
    keep = before < top_p
    keep[0] = True
    kept = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
    return kept / kept.sum()


@torch.no_grad()
def tokens(model, ids: list[int], settings: GenerationSettings, stop: set[int],
           generator: torch.Generator | None = None) -> Iterator[int]:
    """The reply's token ids one at a time (the stop token not included), at most settings.max_new_tokens."""
    if generator is None:
        generator = make_generator(settings)
    device = next(model.parameters()).device
    step, cache = torch.tensor([ids], device=device), None
    for _ in range(settings.max_new_tokens):
        out = model(input_ids=step, cache=cache, use_cache=True, logits_to_keep=1)
        cache = out.cache
        token = _pick(out.logits[0, -1], settings, generator)
        if token in stop:
            return
        yield token
        step = torch.tensor([[token]], device=device)


def make_generator(settings: GenerationSettings) -> torch.Generator:
    """The random stream of a run: seeded with settings.seed, or freshly when it is None."""
    generator = torch.Generator()
    if settings.seed is None:
        generator.seed()
    else:
        generator.manual_seed(settings.seed)
    return generator


class TextPieces:
    """Token ids to text pieces of whole characters (no trailing U+FFFD); decoding a short window of recent tokens
    keeps the cost per token constant and the spacing as a whole decode gives it."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._piece(final=False)

    def flush(self) -> str:
        """What is left (an incomplete character at the very end comes out as U+FFFD)."""
        return self._piece(final=True)

    def _piece(self, final: bool) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


@dataclass
class Reply:
    """A finished reply: its text, how many tokens it took, and why it ended ('stop' or 'length')."""

    text: str = ""
    tokens: int = 0
    ended: str = "stop"


def stream(model, tokenizer, ids: list[int], settings: GenerationSettings, stop: set[int],
           generator: torch.Generator | None = None, reply: Reply | None = None) -> Iterator[str]:
    """The reply to `ids` as text pieces, each as soon as whole; `reply` keeps text, count and ending so far."""
    reply = reply if reply is not None else Reply()
    pieces = TextPieces(tokenizer)
    for token in tokens(model, ids, settings, stop, generator):
        reply.tokens += 1
        piece = pieces.push(token)
        if piece:
            reply.text += piece
            yield piece
    reply.ended = "length" if reply.tokens >= settings.max_new_tokens else "stop"
    piece = pieces.flush()
    if piece:
        reply.text += piece
        yield piece


def fit_conversation(tokenizer, template: ChatTemplate | None, messages: list, budget: int) -> tuple[list, list, int]:
    """(messages, prompt ids, turns dropped): the oldest turns dropped (a system message kept) until the prompt
    fits `budget` tokens or only the last user turn is left."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest, dropped = messages[len(system):], 0
    while True:
        ids = prompt_ids(tokenizer, Prompt(messages=system + rest), template)
        cut = next((i for i in range(1, len(rest)) if rest[i]["role"] == "user"), None)
        if len(ids) <= budget or cut is None:
            return system + rest, ids, dropped
        rest, dropped = rest[cut:], dropped + 1
