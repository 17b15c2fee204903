"""Chat templates rendered with a size and a time bound.

A chat template is code from whoever published the tokenizer; jinja's sandbox keeps it from Python internals but not
from building huge values or looping without end. `ChatTemplate` also bounds every value built, counts steps against
a budget and stops at a deadline (one `QbaraError` per violation); ordinary templates render exactly as
`tokenizer.apply_chat_template(messages, tokenize=False, ...)` does.
"""
from __future__ import annotations

import contextvars
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache, wraps
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.runtime import LoopContext, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from qbara.errors import QbaraError


@dataclass(frozen=True)
class TemplateLimits:
    """The bounds of one rendering."""

    max_chars: int = 1 << 22  # characters (or items) of any one string, list or dict the template builds or outputs
    max_built: int = 1 << 26  # characters (or items) of all values built in one rendering together
    max_number: int = 1 << 63  # magnitude of a number built with * or **
    max_steps: int = 1_000_000  # loop iterations, calls, filters and intercepted operators
    seconds: float = 5.0  # wall time


class _TemplateLimitError(Exception):
    """A template passed one of its `TemplateLimits` (turned into a QbaraError naming the template)."""


class _Budget:
    __slots__ = ("limits", "steps", "built", "deadline")

    def __init__(self, limits: TemplateLimits):
        self.limits, self.steps, self.built = limits, 0, 0
        self.deadline = time.monotonic() + limits.seconds


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("qbara_template_budget", default=None)
_CONTAINERS = (str, list, tuple, dict)
_FORMAT_WIDTH = re.compile(r"\d+")


def _tick(count: int = 1) -> None:
    """Count `count` steps against the budget, checking the deadline every 64 steps."""
    budget = _BUDGET.get()
    if budget is None:  # constant folding at compile time: nothing to bound
        return
    budget.steps += count
    if budget.steps > budget.limits.max_steps:
        raise _TemplateLimitError(f"runs past its limit of {budget.limits.max_steps:,} steps (loop iterations, "
                                 f"calls and operators)")
    if budget.steps & 63 == 0 and time.monotonic() > budget.deadline:
        raise _TemplateLimitError(f"runs past its time limit of {budget.limits.seconds:g} seconds")


def _limits() -> TemplateLimits:
    budget = _BUDGET.get()
    return budget.limits if budget is not None else TemplateLimits()


def _kind(value) -> str:
    return "a string" if isinstance(value, str) else "a mapping" if isinstance(value, dict) else "a list"


def _check_size(size: int, what: str) -> None:
    """Refuse a value of `size` characters or items before it is built."""
    limit = _limits().max_chars
    if size > limit:
        raise _TemplateLimitError(f"builds {what} of {size:,} characters or items (the limit is {limit:,})")


def _built(value):
    """`value`, counted against the bound on one value and on all values built in this rendering."""
    if isinstance(value, _CONTAINERS):
        _check_size(len(value), _kind(value))
        budget = _BUDGET.get()
        if budget is not None:
            budget.built += len(value)
            if budget.built > budget.limits.max_built:
                raise _TemplateLimitError(f"builds more than {budget.limits.max_built:,} characters or items in "
                                         f"all (the limit)")
    elif isinstance(value, int) and abs(value) > _limits().max_number:
        raise _TemplateLimitError(f"builds a number beyond the limit ±{_limits().max_number:,}")
    return value


def _text_size(value, limit: int) -> int:
    """About len(str(value)) at most (containers print their items with repr), stopping once past `limit`."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (list, tuple, dict)):
        items = list(value.items()) if isinstance(value, dict) else value
        total = 2
        for item in items:
            parts = item if isinstance(value, dict) else (item,)
            for part in parts:
                # repr and JSON escape most characters in at most 4 (the rarer longer escapes, up to 12, keep
                # the text within a small factor of the limit); dict items add ": ", list items ", "
                total += (4 * len(part) + 2 if isinstance(part, str) else _text_size(part, limit)) + 2
            if total > limit:
                break
        return total
    if isinstance(value, int):
        return value.bit_length() // 3 + 2
    return 64  # floats, None, booleans, Undefined and the template's own objects print short


def _check_text(values, what: str, extra: int = 0) -> None:
    """Refuse turning `values` into text (plus `extra` characters) when that could be too long."""
    limit = _limits().max_chars
    total = extra
    for value in values:
        if total > limit:
            break
        total += _text_size(value, limit)
    _check_size(total, what)


def _check_number(value, what: str) -> None:
    """Refuse a number argument larger than any string may be long (a width, a count, a repeat)."""
    limit = _limits().max_chars
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > limit:
        raise _TemplateLimitError(f"passes {what} the number {value:,} (the limit is {limit:,})")


def _check_product(left, right) -> None:
    """Refuse `left * right` that would be too large (a sequence repeated, or a number)."""
    for seq, times in ((left, right), (right, left)):
        if isinstance(seq, _CONTAINERS) and isinstance(times, int):
            _check_size(len(seq) * max(times, 0), _kind(seq))
    if isinstance(left, int) and isinstance(right, int):
        limit = _limits().max_number
        if left.bit_length() + right.bit_length() > limit.bit_length() + 1:
            raise _TemplateLimitError(f"builds a number beyond the limit ±{limit:,}")


def _check_power(left, right) -> None:
    if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        limit = _limits().max_number
        if (abs(left).bit_length() - 1) * right > limit.bit_length():
            raise _TemplateLimitError(f"builds a number beyond the limit ±{limit:,} ({left} ** {right})")


def _check_plus(left, right) -> None:
    if isinstance(left, _CONTAINERS) and isinstance(right, _CONTAINERS):
        _check_size(len(left) + len(right), _kind(left))


def _check_format(text, args) -> None:
    """Refuse `text % args` (or `text.format(...)`) whose result could be too long: each field prints one
    argument, padded to at most the largest number written in the format."""
    if not isinstance(text, str):
        return
    args = args if isinstance(args, (tuple, list)) else (args,)
    args = [v for a in args for v in (a.values() if isinstance(a, dict) else (a,))]
    limit = _limits().max_chars
    numbers = _FORMAT_WIDTH.findall(text)
    widest = limit + 1 if any(len(n) > 12 for n in numbers) else max(map(int, numbers), default=0)
    widest = max([widest] + [abs(a) for a in args if isinstance(a, int)])  # '{:>{}}'.format(text, width)
    fields = text.count("%") + text.count("{")
    arg_size = max((_text_size(a, limit) for a in args), default=0)
    _check_size(len(text) + fields * (arg_size + widest), "a formatted string")


def _check_replace(text, old, new, count=-1) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        hits = text.count(old) if old else len(text) + 1
        if isinstance(count, int) and count >= 0:
            hits = min(hits, count)
        _check_size(len(text) + hits * max(len(new) - len(old), 0), "a string")


def _check_indent(text, width=4, *_, **__) -> None:
    if isinstance(text, str):
        step = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        _check_size(len(text) + (text.count("\n") + 1) * step, "an indented string")


def _check_sum(items, attribute=None, start=0) -> None:
    """Refuse summing many sequences: each `+` copies the sum so far (quadratic time)."""
    if isinstance(start, _CONTAINERS) and isinstance(items, (list, tuple)):
        size = len(start) + sum(len(item) for item in items if isinstance(item, _CONTAINERS))
        _check_size(size, _kind(start))
        budget = _limits().max_built
        if size * len(items) > budget:
            raise _TemplateLimitError(f"sums {len(items):,} sequences into one of {size:,} items (copying more than "
                                     f"the limit of {budget:,} items)")


def _check_join(items, separator) -> None:
    if isinstance(items, (list, tuple, dict, str)) and isinstance(separator, str):
        _check_text(items, "a string", extra=len(separator) * len(items))


# Checks run on a filter's arguments before it runs (value first), for the filters whose output can be much
# larger than their arguments' numbers say.
_FILTER_CHECKS = {
    "replace": lambda value, old="", new="", count=None, *_: _check_replace(value, old, new,
                                                                            -1 if count is None else count),
    "join": lambda value, d="", *_, **__: _check_join(value, d),
    "format": lambda value, *args, **kwargs: _check_format(value, args + tuple(kwargs.values())),
    "string": lambda value, *_: _check_text([value], "a string"),
    "tojson": lambda value, *_, **__: _check_text([value], "a JSON string"),
    "pprint": lambda value, *_: _check_text([value], "a string"),
    "indent": _check_indent,
    "sum": _check_sum,
    "wordwrap": lambda value, width=79, long=True, wrapstring=None, *_, **__: _check_size(
        (len(value) + 1) * max(len(wrapstring or ""), 1) if isinstance(value, str) else 0, "a wrapped string"),
}

# The same for the methods of strings a template may call.
_METHOD_CHECKS = {
    "replace": _check_replace,
    "join": lambda separator, items: _check_join(items, separator),
    "format": lambda text, *args, **kwargs: _check_format(text, args + tuple(kwargs.values())),
    "format_map": lambda text, mapping: _check_format(text, (mapping,)),
    "expandtabs": lambda text, tabsize=8: _check_size(len(text) + text.count("\t") * max(tabsize, 0), "a string"),
}


def _bounded_filter(name: str, function):
    """`function` (a jinja filter) counted as a step, with numeric arguments bounded and its result checked."""
    check = _FILTER_CHECKS.get(name)
    skip = 1 if getattr(function, "jinja_pass_arg", None) is not None else 0

    @wraps(function)
    def bounded(*args, **kwargs):
        _tick()
        for value in list(args[skip + 1:]) + list(kwargs.values()):
            _check_number(value, f"{name}'s argument")
        if check is not None:
            check(*args[skip:], **kwargs)
        return _built(function(*args, **kwargs))

    return bounded


class _Counted:
    """An iterable that counts each item it yields as a step (every `for` loop iterates through one)."""

    __slots__ = ("iterable",)

    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        for item in self.iterable:
            _tick()
            yield item

    def __len__(self):
        return len(self.iterable)


class _CountingCodeGenerator(CodeGenerator):
    """jinja's code generator, except that every `for` loop iterates through `environment.counted(...)` and
    every `~` joins through the bounded `environment.concat`."""

    def visit_For(self, node: nodes.For, frame) -> None:
        node.iter = nodes.Call(nodes.EnvironmentAttribute("counted"), [node.iter], [], None, None,
                               lineno=node.iter.lineno)
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame) -> None:
        self.write("environment.concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers in transformers) renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _TemplateNamespace(Namespace):
    """jinja's namespace, refusing underscore names (as transformers' is)."""

    def __init__(*args, **kwargs):  # noqa: N805 - jinja's own signature trick, so namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace cannot hold the attribute {name!r}")


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without the dict type itself."""

    def __call__(self, *args, **kwargs):
        return _built(dict(*args, **kwargs))

    def fromkeys(self, *args, **kwargs):
        return _built(dict.fromkeys(*args, **kwargs))


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format):  # noqa: A002 - the name templates pass it by
    return datetime.now().strftime(format)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """jinja's immutable sandbox with transformers' chat-template options and globals, in which every value
    the template builds, every step it takes and its running time are bounded (see `TemplateLimits`)."""

    code_generator_class = _CountingCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols],
                         finalize=self._finalize)
        self.filters["tojson"] = _tojson
        self.filters = {name: _bounded_filter(name, function) for name, function in self.filters.items()}
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                            namespace=_TemplateNamespace)

    @staticmethod
    def _finalize(value):
        """Each `{{ ... }}` output: a container printed whole is checked before it is turned into text."""
        if not isinstance(value, str):
            _check_text([value], "an output")
        return value

    @staticmethod
    def counted(iterable):
        return _Counted(iterable)

    @staticmethod
    def concat(pieces) -> str:
        """The text of `pieces` (the output, a block's buffer, or the operands of `~`), checked as it grows."""
        limit = _limits().max_chars
        parts, size = [], 0
        for piece in pieces:
            _tick()
            if not isinstance(piece, str):
                _check_text([piece], "a string")
                piece = str(piece)
            size += len(piece)
            _check_size(size, "a string")
            parts.append(piece)
        if size > limit:
            _check_size(size, "a string")
        return _built("".join(parts))

    def call_binop(self, context, operator, left, right):
        _tick()
        if operator == "*":
            _check_product(left, right)
        elif operator == "**":
            _check_power(left, right)
        elif operator == "+":
            _check_plus(left, right)
        elif operator == "%":
            _check_format(left, right)
        return _built(self.binop_table[operator](left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature
        """Every call the template makes: a step; a recursive loop's items counted; a method of a string
        checked for the size of what it would build; numeric arguments bounded."""
        _tick()
        if isinstance(__obj, LoopContext) and args:
            args = (_Counted(args[0]),) + args[1:]
        elif not isinstance(__obj, Macro):
            for value in list(args) + list(kwargs.values()):
                _check_number(value, "an argument")
            method = getattr(__obj, "__wrapped__", __obj)  # jinja wraps str.format for its sandbox
            owner = getattr(method, "__self__", None)
            check = _METHOD_CHECKS.get(getattr(method, "__name__", "")) if isinstance(owner, str) else None
            if check is not None:
                check(owner, *args, **kwargs)
        return _built(super().call(__context, __obj, *args, **kwargs))


@lru_cache(maxsize=16)
def _compile(text: str):
    return _BoundedEnvironment().from_string(text)


def _plain(value):
    """A copy of `value` made of JSON types (as transformers hands templates), other objects by type name."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    for kind in (str, int, float):
        if isinstance(value, kind):
            return kind(value)
    return f"<{type(value).__name__}>"


_REASONING = ("reasoning_content", "thinking", "reasoning")


def _messages(messages: list) -> list:
    """The messages as transformers hands them to a template: keys with None values dropped, plain types,
    reasoning under both `thinking` and `reasoning_content`."""
    out = []
    for message in messages:
        message = {k: _plain(v) for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


class ChatTemplate:
    """A chat template compiled once in the bounded sandbox; `render` applies it to one conversation."""

    def __init__(self, text: str, source: str, special_tokens: dict | None = None,
                 limits: TemplateLimits = TemplateLimits(), fix: str = "use a tokenizer with a plain chat template"):
        self.source, self.limits, self.fix = source, limits, fix
        self.special_tokens = dict(special_tokens or {})
        self._template = self._guard(_compile, text)

    @classmethod
    def of(cls, tokenizer, limits: TemplateLimits = TemplateLimits()) -> ChatTemplate:
        """The chat template of `tokenizer` (refused with a QbaraError when it has none)."""
        try:
            text = tokenizer.get_chat_template()
        except ValueError as err:
            raise QbaraError(f"the tokenizer from {getattr(tokenizer, 'name_or_path', '?')!r} has no usable chat "
                             f"template ({str(err).splitlines()[0][:200]}); chat data needs one (tokenizer_config.json "
                             f"chat_template), or use instruction or text data") from None
        return cls(text, _template_source(tokenizer), tokenizer.special_tokens_map, limits)

    def render(self, messages: list, *, add_generation_prompt: bool = False, tools: list | None = None,
               documents: list | None = None, **kwargs) -> str:
        """The conversation as text, as `tokenizer.apply_chat_template(messages, tokenize=False, ...)` gives."""
        variables = _plain({**self.special_tokens, **kwargs})
        token = _BUDGET.set(_Budget(self.limits))
        try:
            return self._guard(self._template.render, messages=_messages(messages), tools=_plain(tools),
                               documents=_plain(documents), add_generation_prompt=add_generation_prompt,
                               **variables)
        finally:
            _BUDGET.reset(token)

    def _guard(self, function, *args, **kwargs):
        """`function(...)`, any failure of the template turned into one QbaraError naming it."""
        fix = self.fix
        try:
            return function(*args, **kwargs)
        except _TemplateLimitError as err:
            raise QbaraError(f"the chat template in {self.source} {err}; {fix}") from None
        except jinja2.exceptions.SecurityError as err:
            raise QbaraError(f"the chat template in {self.source} tries to leave jinja's sandbox "
                             f"({type(err).__name__}: {err}); {fix}") from None
        except MemoryError:
            raise QbaraError(f"the chat template in {self.source} runs out of memory; {fix}") from None
        except RecursionError:
            raise QbaraError(f"the chat template in {self.source} recurses past Python's depth limit; {fix}") from None
        except Exception as err:  # TemplateError (raise_exception), TypeError, ZeroDivisionError...: the template's
            raise QbaraError(f"the chat template in {self.source} fails ({type(err).__name__}: {err}); "
                             f"{fix}") from None


def _template_source(tokenizer) -> str:
    """Where `tokenizer`'s chat template was read from, for messages."""
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or "."))
    if (folder / "chat_template.jinja").is_file():
        return str(folder / "chat_template.jinja")
    return f"{folder / 'tokenizer_config.json'} (chat_template)"
