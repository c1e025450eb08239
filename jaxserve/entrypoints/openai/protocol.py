"""Request bodies of the OpenAI-compatible API (pydantic, strict JSON types).

Strict: "0.5" is not a number and true is not an integer, so a wrong type is a 400 naming
the field instead of a silent coercion. Unknown fields are ignored (as OpenAI and vLLM do).
Ranges are checked by SamplingParams and the engine, whose ValueErrors name the field; the
models here check types and what only the HTTP API has (message roles, tools, tool_choice).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_CONFIG = ConfigDict(strict=True, extra="ignore")
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

TokenIds = list[int]
Prompt = str | list[str] | TokenIds | list[TokenIds]


class StreamOptions(BaseModel):
    model_config = _CONFIG
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM extra: usage on every chunk


class _SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = _CONFIG
    model: str | None = None  # None: the served model
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a JSON string) -> bias
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Extras (vLLM names), sent by the openai client through extra_body.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # vLLM's constrained decoding: {json | regex | choice | grammar | json_object, ...}
    structured_outputs: dict[str, Any] | None = None
    # vLLM's older names of the same (still sent by many clients): one of them at most.
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _int_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not re.fullmatch(r"-?\d+", key.strip()):
                raise ValueError(f"keys must be token ids (integers as strings), got {key!r}")
        return value

    def logit_bias_ids(self) -> dict[int, float] | None:
        return None if self.logit_bias is None else {int(k): v for k, v in self.logit_bias.items()}


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    max_tokens: int | None = 16
    logprobs: int | None = None  # top logprobs per token
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    response_format: "ResponseFormat | None" = None
    prompt_logprobs: int | None = None  # vLLM extra: top logprobs per prompt position, in each choice
    # vLLM extras: beam search (openai/beam.py), best_of as the beam width
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    model_config = _CONFIG
    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = _CONFIG
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = _CONFIG
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(BaseModel):
    model_config = _CONFIG
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not FUNCTION_NAME.match(value):
            raise ValueError(f"function names must match {FUNCTION_NAME.pattern}, got {value!r}")
        return value


class Tool(BaseModel):
    model_config = _CONFIG
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = _CONFIG
    name: str


class NamedToolChoice(BaseModel):
    model_config = _CONFIG
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the grammar enforces the schema either way


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text", "json_object", "json_schema"]  # see openai/structured.py
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    # Extras (vLLM names).
    add_generation_prompt: bool = True
    # beam search (openai/beam.py): n is the beam width, every beam a choice
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_tools(self) -> "ChatCompletionRequest":
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice: function {choice.function.name!r} is not in tools "
                             f"({', '.join(names) or 'none given'})")
        if choice == "required" and not names:
            raise ValueError("tool_choice: 'required' needs at least one entry in tools")
        return self


class TokenizeRequest(BaseModel):
    model_config = _CONFIG
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give exactly one of prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = _CONFIG
    model: str | None = None
    tokens: list[int]


CompletionRequest.model_rebuild()  # its response_format refers to ResponseFormat, defined below it
