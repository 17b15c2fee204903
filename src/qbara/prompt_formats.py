"""Prompt formats for training data (`data.template`): the shipped chat templates (Alpaca, ChatML, Llama 3, Gemma),
`auto` (the tokenizer's own, else Alpaca) or a Jinja file, resolved into one `PromptFormat` rendered in the bounded
sandbox (`qbara.templates.ChatTemplate`). Instruction records become the conversation a chat front end builds
(system, user: instruction [+ input], assistant: output), so a fine-tune is served with the prompt it was trained on.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from qbara.errors import QbaraError
from qbara.templates import ChatTemplate
from qbara.validate import read_text_file

# Every tag trims the whitespace around it ({%- -%}), so the texts render the same with or without jinja's
# trim_blocks / lstrip_blocks (transformers and llama.cpp set them; a plain jinja2.Environment does not).

# The Alpaca prompt (Taori et al., 2023): its preamble (replaced by a system message when there is one), then
# "### Instruction:" and "### Response:" sections; each answer ends with the tokenizer's end-of-sequence token.
_ALPACA = r"""{%- if messages and messages[0]['role'] == 'system' -%}
{{ messages[0]['content'] + '\n\n' }}
{%- set turns = messages[1:] -%}
{%- else -%}
{{ 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n' }}
{%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
{%- if message['role'] == 'user' -%}
{{ ('' if loop.first else '\n\n') + '### Instruction:\n' + message['content'] + '\n\n' }}
{%- elif message['role'] == 'assistant' -%}
{{ '### Response:\n' + message['content'] + eos_token }}
{%- else -%}
{{ raise_exception('Alpaca has system (first), user and assistant messages, not ' + message['role']) }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '### Response:\n' }}
{%- endif -%}
"""

# ChatML (OpenAI; Qwen, SmolLM2): <|im_start|>ROLE, a newline, the content, <|im_end|> and a newline per message.
_CHATML = r"""{%- for message in messages -%}
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '<|im_start|>assistant\n' }}
{%- endif -%}
"""

# Llama 3 (Meta): <|begin_of_text|>, then per message a <|start_header_id|>ROLE<|end_header_id|> header, a blank
# line, the content (trimmed) and <|eot_id|>.
_LLAMA3 = r"""{{- '<|begin_of_text|>' -}}
{%- for message in messages -%}
{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + (message['content'] | trim) + '<|eot_id|>' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif -%}
"""

# Gemma (Google): <bos>, then <start_of_turn>user / <start_of_turn>model turns, each content trimmed and closed by
# <end_of_turn> and a newline; Gemma has no system role: a system message opens the first turn, a blank line after it.
_GEMMA = r"""{{- '<bos>' -}}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system = messages[0]['content'] + '\n\n' -%}
{%- set turns = messages[1:] -%}
{%- else -%}
{%- set system = '' -%}
{%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{%- if role not in ('user', 'model') -%}
{{ raise_exception('Gemma has system (first), user and assistant messages, not ' + message['role']) }}
{%- endif -%}
{{ '<start_of_turn>' + role + '\n' + (system if loop.first else '') + (message['content'] | trim) + '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '<start_of_turn>model\n' }}
{%- endif -%}
"""

NAMED = {"alpaca": _ALPACA, "chatml": _CHATML, "llama3": _LLAMA3, "gemma": _GEMMA}
CHOICES = ("auto", *NAMED)
# The format's own tokens, which a tokenizer made for it holds as single (special) tokens.
_MARKERS = {"chatml": ("<|im_start|>", "<|im_end|>"),
           "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
           "gemma": ("<bos>", "<start_of_turn>", "<end_of_turn>")}
_MAX_TEMPLATE_BYTES = 1 << 20  # a chat template file (the largest published ones are tens of KB)
_CHOOSE = f"choose {', '.join(CHOICES)}, or the path of a Jinja chat template file"


@dataclass(frozen=True)
class PromptFormat:
    """The template training data is rendered with: its name (a CHOICES name, `tokenizer` for the tokenizer's own
    or the file's path), its Jinja text (what the adapter records) and the compiled template."""

    name: str
    text: str
    template: ChatTemplate


def read_template_file(path, what: str = "chat template file", fix: str | None = None) -> str:
    """The Jinja text of a chat template file, read bounded (a regular UTF-8 file of at most MAX_TEMPLATE_BYTES)
    and compiled in the sandbox: a missing, binary or broken file is one QbaraError."""
    text = read_text_file(path, what, max_bytes=_MAX_TEMPLATE_BYTES)
    ChatTemplate(text, str(path), fix=fix or f"fix the Jinja in {path}")
    return text


def check_template_choice(choice: str) -> None:
    """Refuse, at config time, a data.template that is neither a name of CHOICES nor a readable Jinja file."""
    if choice in CHOICES:
        return
    if not Path(choice).expanduser().is_file():
        kind = "a folder" if Path(choice).expanduser().is_dir() else "no such file"
        if "/" not in choice and "." not in choice:
            kind = "not a template name"
        raise QbaraError(f"data.template {choice!r} ({kind}): {_CHOOSE}")
    read_template_file(Path(choice).expanduser(), "data.template file",
                       fix=f"fix the Jinja in {choice}, or set data.template to one of {', '.join(CHOICES)}")


def resolve_template(choice: str, tokenizer) -> PromptFormat:
    """The PromptFormat `choice` (a data.template value) names for `tokenizer`: `auto` is the tokenizer's chat
    template when it has one, else Alpaca. A named format whose markers are not single tokens of the tokenizer
    is used with a warning (the model then learns them as pieces of text)."""
    if choice == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if own:
            return PromptFormat("tokenizer", tokenizer.get_chat_template(), ChatTemplate.of(tokenizer))
        choice = "alpaca"
    if choice in NAMED:
        name, text = choice, NAMED[choice]
        _warn_split_markers(choice, tokenizer)
    else:
        check_template_choice(choice)
        name, text = choice, read_template_file(Path(choice).expanduser(), "data.template file")
    if choice == "alpaca" and not getattr(tokenizer, "eos_token", None):
        raise QbaraError("data.template alpaca ends each answer with the tokenizer's eos_token, and this tokenizer "
                         "has none; set its eos_token, or choose another data.template")
    return PromptFormat(name, text, ChatTemplate(text, f"data.template {name}", tokenizer.special_tokens_map,
                                                 fix="fix data.template"))


def _warn_split_markers(name: str, tokenizer) -> None:
    split = [m for m in _MARKERS.get(name, ()) if len(tokenizer(m, add_special_tokens=False).input_ids) != 1]
    if split:
        warnings.warn(f"data.template {name}: {', '.join(split)} {'is' if len(split) == 1 else 'are'} not a single "
                      f"token of this tokenizer (a tokenizer made for the {name} format has them); training "
                      f"goes on with them as plain text", stacklevel=3)


def instruction_messages(instruction: str, output: str, extra: str = "", system: str = "") -> list[dict]:
    """An instruction record as a conversation: [system] + user (instruction, a blank line and the input when
    there is one) + assistant (output)."""
    messages = [{"role": "system", "content": system}] if system else []
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
