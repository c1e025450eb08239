"""OpenAI-compatible HTTP front end: /v1/completions, /v1/chat/completions, /v1/models,
/health, /metrics, /tokenize, /detokenize.

    app = build_app(engine, served_model_name="my-model", api_key=None, max_concurrent=None,
                    chat_template=None, tool_parser=None)          # a FastAPI app
    http = HttpFrontend(engine, host="127.0.0.1", port=8000, served_model_name="my-model")
    await http.start(); ...; await http.stop(grace=10.0)           # inside the serving loop
"""

from jaxserve.entrypoints.openai.app import build_app
from jaxserve.entrypoints.openai.frontend import HttpFrontend

__all__ = ["HttpFrontend", "build_app"]
