"""vLLM's runtime adapter routes (behind the API key, like every non-probe path; see app.Gate):

    POST /v1/load_lora_adapter   {"lora_name": str, "lora_path": str}
        200 "Success: LoRA adapter '<name>' added successfully."
        400 a bad adapter (rank, target modules, base-model mismatch, missing files), a taken name,
            or a server started without --enable-lora
    POST /v1/unload_lora_adapter {"lora_name": str}
        200 "Success: LoRA adapter '<name>' removed successfully."
        404 an unknown name; 409 while requests of the adapter are unfinished (nothing changes)
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

from jaxserve.engine.async_llm import EngineDeadError
from jaxserve.entrypoints.lora_modules import lora_modules
from jaxserve.entrypoints.openai.errors import OpenAIError, bad_request, engine_dead


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: int | None = None  # vLLM's body has it; the name decides


def add_lora_routes(app: FastAPI, engine: Any, parse) -> None:
    """parse(raw bytes, model) -> the validated body (OpenAIServing.parse: a 400 naming the field)."""
    registry = lora_modules(engine)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> PlainTextResponse:
        body = parse(await request.body(), LoadLoRAAdapterRequest)
        try:
            await registry.load(engine, body.lora_name, body.lora_path)
        except ValueError as e:
            raise bad_request(str(e), param="lora_path" if "already" not in str(e) else "lora_name") from None
        except EngineDeadError as e:
            raise engine_dead(e) from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> PlainTextResponse:
        body = parse(await request.body(), UnloadLoRAAdapterRequest)
        try:
            await registry.unload(engine, body.lora_name)
        except KeyError:
            raise OpenAIError(404, f"The lora adapter '{body.lora_name}' cannot be found.", param="lora_name",
                              type="not_found_error", code="model_not_found") from None
        except ValueError as e:
            raise OpenAIError(409, str(e), param="lora_name", code="lora_in_use") from None
        except EngineDeadError as e:
            raise engine_dead(e) from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
