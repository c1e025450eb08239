"""Errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}}.

Three sources, one shape:
  - pydantic ValidationError (wrong types, missing fields, malformed JSON): param is the
    top-level field of the first error;
  - ValueError from SamplingParams or the engine ("max_tokens 600 does not fit: ..."):
    their messages start with the field's name, which is mapped to the request's field;
  - OpenAIError raised by the front end itself (unknown model, auth, rate limit, ...).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def engine_dead(e: BaseException) -> OpenAIError:
    return OpenAIError(503, f"the engine is not running: {e}", type="server_error", code="engine_dead")


def request_failed(e: BaseException) -> OpenAIError:
    """A failure traced to this request alone (the engine goes on serving the others)."""
    return OpenAIError(500, str(e), type="server_error", code="request_failed")


def from_validation_error(e: ValidationError, fields: Collection[str]) -> OpenAIError:
    first = e.errors(include_url=False)[0]
    loc = [str(p) for p in first["loc"]]
    if first["type"] == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {first['msg']}", code="invalid_json")
    if not loc:
        if first["type"] == "model_type":
            return bad_request("the request body must be a JSON object")
        message = str(first.get("ctx", {}).get("error", first["msg"]))
        return bad_request(message, param=_leading_field(message, fields, {}))
    where = ".".join(loc)
    value = f", got {_short(first['input'])}" if first["type"] != "missing" else ""
    return bad_request(f"{where}: {first['msg']}{value}", param=loc[0])


def from_value_error(e: ValueError, fields: Collection[str], aliases: Mapping[str, str]) -> OpenAIError:
    message = str(e)
    param = _leading_field(message, fields, aliases)
    if param is not None and not message.startswith(param):  # engine name != API name: say both
        message = f"{param}: {message}"
    return bad_request(message, param=param)


def _leading_field(message: str, fields: Collection[str], aliases: Mapping[str, str]) -> str | None:
    m = re.match(r"[A-Za-z_]+", message)
    if m is None:
        return None
    word = aliases.get(m.group(0), m.group(0))
    return word if word in fields else None


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
