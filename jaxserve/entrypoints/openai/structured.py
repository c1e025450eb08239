"""Structured outputs in the OpenAI API: `response_format`, vLLM's `structured_outputs` extra
field, and tool calls enforced by a grammar.

    response_format {"type": "json_object"}               any JSON object
    response_format {"type": "json_schema",
                     "json_schema": {name, schema, strict}} that schema (strict or not: the
                                                           grammar always enforces it)
    structured_outputs {json | regex | choice | grammar   StructuredOutputsParams as given
                        | json_object, ...}  (extra body)
    guided_json | guided_regex | guided_choice |          vLLM's older names: the same, one
      guided_grammar (extra body)                         field each
    tool_choice "required"                                a JSON array of one or more
                                                          {"name": <a tool>, "parameters":
                                                          <its schema>} (at most one when
                                                          parallel_tool_calls is false)
    tool_choice {"type": "function", "function": {name}}  that function's parameters schema:
                                                          the whole output is its arguments

`"auto"` stays with the configured text parsers (tool_parsers.py). The enforced answers are
read by the two ToolParsers below, so streaming reuses ToolStreamer: a call's id and name
go out once its name is complete, then its arguments as they grow.
"""

from __future__ import annotations

from typing import Any

from jaxserve.entrypoints.openai.errors import bad_request
from jaxserve.entrypoints.openai.tool_parsers import (Parsed, ParsedCall, ToolParser, _call_from, _skip_ws,
                                                      scan_object)
from jaxserve.sampling_params import StructuredOutputsParams, as_structured_outputs

ANY_OBJECT = {"type": "object"}


GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def _guided(body: Any) -> tuple[str | None, dict[str, Any] | None]:
    """(the guided_* field set, as structured_outputs fields); a 400 when several are set."""
    given = [name for name in GUIDED if getattr(body, name, None) is not None]
    if not given:
        return None, None
    if len(given) > 1 or getattr(body, "structured_outputs", None) is not None:
        raise bad_request(f"{given[0]}: set one of structured_outputs, {', '.join(GUIDED)}, got "
                          f"{', '.join(given)}{' and structured_outputs' if len(given) == 1 else ''}", param=given[0])
    return given[0], {given[0].removeprefix("guided_"): getattr(body, given[0])}


def from_request(body: Any) -> StructuredOutputsParams | None:
    """The constraint a request's `structured_outputs` (or vLLM's older guided_* fields) or
    `response_format` asks for (a 400 naming the field when two are set or one is malformed)."""
    guided, so = _guided(body)
    so = so if so is not None else getattr(body, "structured_outputs", None)
    fmt = getattr(body, "response_format", None)
    constrained_format = fmt is not None and fmt.type != "text"
    field = guided or "structured_outputs"
    if so is not None and constrained_format:
        raise bad_request(f"{field}: set either {field} or a response_format of type {fmt.type!r}, not both",
                          param=field)
    try:
        if so is not None:
            return as_structured_outputs(so)
        if not constrained_format:
            return None
    except (TypeError, ValueError) as e:
        message = str(e) if str(e).startswith("structured_outputs") else f"structured_outputs: {e}"
        raise bad_request(message if guided is None else f"{guided}: {message}", param=field) from None
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if fmt.json_schema is None:
        raise bad_request("response_format: type 'json_schema' needs a json_schema object", param="response_format")
    schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else ANY_OBJECT
    return StructuredOutputsParams(json=schema)


def error_field(body: Any) -> str:
    """The request field a structured_outputs ValueError is about."""
    if getattr(body, "tools", None) and getattr(body, "tool_choice", None) not in (None, "none", "auto"):
        return "tools"
    guided = next((name for name in GUIDED if getattr(body, name, None) is not None), None)
    if guided is not None:
        return guided
    fmt = getattr(body, "response_format", None)
    if getattr(body, "structured_outputs", None) is None and fmt is not None and fmt.type != "text":
        return "response_format"
    return "structured_outputs"


# -- enforced tool calls -----------------------------------------------------------------


def _parameters(tool: Any) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else ANY_OBJECT


def required_calls_schema(tools: list[Any], parallel: bool) -> dict[str, Any]:
    """vLLM's schema for tool_choice "required": [{"name": ..., "parameters": ...}, ...]."""
    items = [{"type": "object", "properties": {"name": {"enum": [t.function.name]}, "parameters": _parameters(t)},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else
                              {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def tool_constraint(body: Any) -> tuple[StructuredOutputsParams, ToolParser] | None:
    """(constraint, parser of the answer) when tool_choice is "required" or a named function."""
    choice = body.tool_choice
    if not body.tools or choice in (None, "none", "auto"):
        return None
    if from_request(body) is not None:
        raise bad_request(f"tool_choice: {choice if isinstance(choice, str) else 'a named function'!r} is enforced "
                          "by a grammar and cannot be combined with response_format or structured_outputs",
                          param="tool_choice")
    if choice == "required":
        schema, parser = required_calls_schema(body.tools, body.parallel_tool_calls), RequiredCallsParser()
    else:
        tool = next(t for t in body.tools if t.function.name == choice.function.name)
        schema, parser = _parameters(tool), NamedCallParser(tool.function.name)
    try:
        return StructuredOutputsParams(json=schema), parser
    except ValueError as e:
        raise bad_request(f"tools: {e}", param="tools") from None


class NamedCallParser(ToolParser):
    """The whole (grammar-enforced) output is the arguments of one named function."""

    def __init__(self, name: str):
        self.name = name

    def parse(self, text: str, final: bool) -> Parsed:
        return Parsed("", [ParsedCall(self.name, text)])


class RequiredCallsParser(ToolParser):
    """The (grammar-enforced) output is [{"name": ..., "parameters": {...}}, ...]; each call's
    arguments are the raw text of its parameters, as far as it is written."""

    def parse(self, text: str, final: bool) -> Parsed:
        calls: list[ParsedCall] = []
        i = _skip_ws(text, 0)
        if i >= len(text) or text[i] != "[":
            return Parsed(text if final else "", [])
        i += 1
        while True:
            i = _skip_ws(text, i)
            if i >= len(text) or text[i] != "{":
                break
            obj = scan_object(text, i)
            call = _call_from(text, obj)
            if call.name is None:
                break
            calls.append(call)
            if obj.end is None:
                break
            i = _skip_ws(text, obj.end)
            if i >= len(text) or text[i] != ",":
                break
            i += 1
        return Parsed("", calls)
