"""Tool-call parsers: the model's text -> OpenAI `tool_calls`, whole or streamed.

A parser is a pure function of the text generated so far:

    parse(text, final) -> Parsed(content, calls)

`content` is the part of the text that is NOT tool-call markup and is safe to show now;
`calls` are the tool calls seen so far, each with its name once the name is complete and
the raw JSON of its arguments as far as it has been written. Content keeps its whitespace
as written (with no markup, it is exactly the text); only whitespace that merely separates
content from markup is dropped. While `final` is False the parser holds back what could
still turn into markup (a partial `<tool_call>` tag, trailing whitespace), so every field
only ever grows as text is appended.

That property is what streaming rests on: `ToolStreamer` re-parses the whole text after
each engine delta and sends only the difference (content, then per call a first delta with
id, type and function.name, then argument fragments). The concatenated stream therefore
equals the non-streaming answer, which is the same parse with final=True.

Formats:
  hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call> (any number; text
               outside the tags is content)
  llama3_json  [<|python_tag|>]{"name": ..., "parameters": {...}} [; {...}]  (the whole
               output is tool calls when it starts with `{` or the tag; else it is content)
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any, Callable

_SCALAR = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?|true|false|null")


@dataclasses.dataclass
class ParsedCall:
    name: str | None  # None until the whole name string has been written
    arguments: str  # raw JSON text of the arguments written so far ("" while unknown)


@dataclasses.dataclass
class Parsed:
    content: str
    calls: list[ParsedCall]

    @property
    def named_calls(self) -> list[ParsedCall]:
        return [c for c in self.calls if c.name is not None]


# -- a tolerant scanner for partial JSON -------------------------------------------------


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def value_end(text: str, i: int) -> int | None:
    """End index of the JSON value starting at text[i], or None if it is not complete yet
    (or is malformed). A scalar at the very end of the text counts as incomplete."""
    if i >= len(text):
        return None
    c = text[i]
    if c == '"':
        j = i + 1
        while j < len(text):
            if text[j] == "\\":
                j += 2
                continue
            if text[j] == '"':
                return j + 1
            j += 1
        return None
    if c in "{[":
        depth, j, in_str = 0, i, False
        while j < len(text):
            ch = text[j]
            if in_str:
                if ch == "\\":
                    j += 1
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    m = _SCALAR.match(text, i)
    if m is None or m.end() == len(text):
        return None
    return m.end()


@dataclasses.dataclass
class _Object:
    spans: dict[str, tuple[int, int | None]]  # key -> (value start, value end or None)
    end: int | None  # end of the object, None while incomplete
    valid: bool = True


def scan_object(text: str, i: int) -> _Object:
    """Top-level keys of the (possibly partial) JSON object starting at text[i] == '{'."""
    spans: dict[str, tuple[int, int | None]] = {}
    j = _skip_ws(text, i + 1)
    while j < len(text):
        if text[j] == "}":
            return _Object(spans, j + 1)
        if text[j] != '"':
            return _Object(spans, None, valid=False)
        key_end = value_end(text, j)
        if key_end is None:
            return _Object(spans, None)
        key = json.loads(text[j:key_end])
        j = _skip_ws(text, key_end)
        if j >= len(text):
            return _Object(spans, None)
        if text[j] != ":":
            return _Object(spans, None, valid=False)
        start = _skip_ws(text, j + 1)
        end = value_end(text, start)
        spans[key] = (start, end)
        if end is None:
            return _Object(spans, None, valid=start >= len(text) or text[start] in '{["-0123456789tfn')
        j = _skip_ws(text, end)
        if j < len(text) and text[j] == ",":
            j = _skip_ws(text, j + 1)
        elif j < len(text) and text[j] != "}":
            return _Object(spans, None, valid=False)
    return _Object(spans, None)


def _call_from(text: str, obj: _Object) -> ParsedCall:
    name = None
    if "name" in obj.spans:
        start, end = obj.spans["name"]
        if end is not None:
            value = json.loads(text[start:end])
            name = value if isinstance(value, str) else None
    span = obj.spans.get("arguments", obj.spans.get("parameters"))
    arguments = ""
    if span is not None:
        arguments = _arguments_text(text, span)
    elif obj.end is not None:
        arguments = "{}"  # a complete call without arguments
    return ParsedCall(name, arguments)


def _arguments_text(text: str, span: tuple[int, int | None]) -> str:
    start, end = span
    if start >= len(text):
        return ""
    if end is None:
        # An object or array streams as written; anything else waits until it is whole.
        return text[start:] if text[start] in "{[" else ""
    raw = text[start:end]
    if raw.startswith('"'):  # arguments encoded as a JSON string: unwrap it
        return json.loads(raw)
    return raw


def _hold_back(text: str, tag: str) -> str:
    """text minus a trailing partial `tag` (it may be the start of markup)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return text[:-k]
    return text


def _content(pieces: list[str], final: bool) -> str:
    """The text outside markup, whitespace kept as the model wrote it, except where it only
    separates content from markup: a whitespace-only piece before the first markup or after
    the last one is dropped. While not final, trailing whitespace waits for what follows it
    (it may precede a tag), so the content only ever grows as text is appended."""
    if len(pieces) > 1 and not pieces[0].strip():
        pieces = pieces[1:]
    text = "".join(pieces)
    if not final:
        return text.rstrip()
    return text.rstrip() if len(pieces) > 1 and not pieces[-1].strip() else text


# -- the formats --------------------------------------------------------------------------


class ToolParser:
    name = ""

    def parse(self, text: str, final: bool) -> Parsed:
        raise NotImplementedError


class HermesToolParser(ToolParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number of times."""

    name = "hermes"
    start_tag, end_tag = "<tool_call>", "</tool_call>"

    def parse(self, text: str, final: bool) -> Parsed:
        content, calls, pos = [], [], 0
        while True:
            k = text.find(self.start_tag, pos)
            if k < 0:
                rest = text[pos:]
                content.append(rest if final else _hold_back(rest, self.start_tag))
                break
            content.append(text[pos:k])
            content.append("")  # the markup's place: what follows it is a piece of its own
            j = _skip_ws(text, k + len(self.start_tag))
            if j >= len(text):
                break  # the tag has opened; its JSON has not started
            if text[j] != "{":
                e = text.find(self.end_tag, j)
                if e < 0:
                    break
                pos = e + len(self.end_tag)  # not JSON: drop the block
                continue
            obj = scan_object(text, j)
            calls.append(_call_from(text, obj))
            e = text.find(self.end_tag, obj.end) if obj.end is not None else -1
            if e < 0:
                break
            pos = e + len(self.end_tag)
        return Parsed(_content(content, final), calls)


class Llama3JsonToolParser(ToolParser):
    """`[<|python_tag|>]{"name": ..., "parameters": {...}}`, several separated by `;`."""

    name = "llama3_json"
    tag = "<|python_tag|>"

    def parse(self, text: str, final: bool) -> Parsed:
        i = _skip_ws(text, 0)
        if text.startswith(self.tag, i):
            i = _skip_ws(text, i + len(self.tag))
        elif self.tag.startswith(text[i:]) and not final:
            return Parsed("", [])  # empty so far, or a partial tag: undecided
        if i >= len(text) or text[i] != "{":
            return Parsed(_content([text], final) if i < len(text) or final else "", [])
        calls: list[ParsedCall] = []
        while i < len(text) and text[i] == "{":
            obj = scan_object(text, i)
            if not obj.valid:
                break
            calls.append(_call_from(text, obj))
            if obj.end is None:
                break
            i = _skip_ws(text, obj.end)
            if i < len(text) and text[i] == ";":
                i = _skip_ws(text, i + 1)
        if final and not any(c.name for c in calls):
            return Parsed(text, [])  # JSON, but not a tool call: plain content, as written
        return Parsed("", calls)


class NamedFunctionParser(ToolParser):
    """tool_choice names one function: the model was shown only that tool. Its answer is
    parsed by the configured format when there is one; otherwise (or when that finds no
    call) a bare JSON object is taken as that function's arguments. Decided only at the
    end, so a streamed answer arrives in one piece."""

    def __init__(self, function: str, inner: ToolParser | None):
        self.function, self.inner = function, inner

    def parse(self, text: str, final: bool) -> Parsed:
        if not final:
            return Parsed("", [])
        if self.inner is not None:
            parsed = self.inner.parse(text, final=True)
            if parsed.named_calls:
                return parsed
        stripped = text.strip()
        try:
            is_object = isinstance(json.loads(stripped), dict)
        except ValueError:
            is_object = False
        if is_object:
            return Parsed("", [ParsedCall(self.function, stripped)])
        return Parsed(text, [])  # not a call: the content as written


TOOL_PARSERS: dict[str, Callable[[], ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
}


def get_tool_parser(name: str | None) -> ToolParser | None:
    if name is None:
        return None
    if name not in TOOL_PARSERS:
        raise ValueError(f"tool_parser must be one of {', '.join(TOOL_PARSERS)}, got {name!r}")
    return TOOL_PARSERS[name]()


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_calls_json(calls: list[ParsedCall]) -> list[dict[str, Any]]:
    """Complete calls in the OpenAI message shape."""
    return [{"id": new_call_id(), "type": "function",
             "function": {"name": c.name, "arguments": c.arguments or "{}"}} for c in calls]


class ToolStreamer:
    """Turns the growing text of one choice into OpenAI chat deltas."""

    def __init__(self, parser: ToolParser, max_calls: int | None = None):
        self.parser, self.max_calls = parser, max_calls
        self.text = ""
        self._content_sent = 0
        self._headers: list[str] = []  # call ids sent, one per call index
        self._args_sent: list[int] = []
        self.num_calls = 0

    def feed(self, new_text: str, final: bool) -> list[dict[str, Any]]:
        """Appends text; returns the chat `delta` objects to send, in order."""
        self.text += new_text
        parsed = self.parser.parse(self.text, final)
        deltas: list[dict[str, Any]] = []
        if len(parsed.content) > self._content_sent:
            deltas.append({"content": parsed.content[self._content_sent:]})
            self._content_sent = len(parsed.content)
        calls = parsed.named_calls[: self.max_calls]
        for index, call in enumerate(calls):
            if index == len(self._headers):
                self._headers.append(new_call_id())
                self._args_sent.append(0)
                deltas.append({"tool_calls": [{"index": index, "id": self._headers[index], "type": "function",
                                               "function": {"name": call.name, "arguments": ""}}]})
            args = call.arguments or ("{}" if final else "")
            if len(args) > self._args_sent[index]:
                deltas.append({"tool_calls": [{"index": index,
                                               "function": {"arguments": args[self._args_sent[index]:]}}]})
                self._args_sent[index] = len(args)
        self.num_calls = len(self._headers)
        return deltas
