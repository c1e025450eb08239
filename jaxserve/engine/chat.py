"""Chat prompts: messages -> token ids through the tokenizer's (or an override) chat template.

Shared by `LLM.chat` and the OpenAI HTTP front end. The template writes the special tokens
(BOS, headers) itself, so the rendered text is tokenized without adding any.
"""

from __future__ import annotations

from typing import Any, Sequence

import jinja2


class ChatTemplateError(ValueError):
    """No chat template, or messages it cannot render; the message says which."""


def render_chat(tokenizer: Any, conversation: Sequence[dict[str, Any]], *, chat_template: str | None = None,
                tools: list[dict] | None = None, add_generation_prompt: bool = True, **template_kwargs: Any) -> list[int]:
    """Token ids of the templated conversation (a list of {"role", "content", ...} dicts)."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError("this model has no chat template; pass one (chat_template=..., --chat-template FILE)")
    try:
        text = tokenizer.apply_chat_template(list(conversation), tools=tools, chat_template=chat_template,
                                             add_generation_prompt=add_generation_prompt, tokenize=False,
                                             **template_kwargs)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError) as e:
        raise ChatTemplateError(f"messages could not be rendered by the chat template: {e}") from None
    return list(tokenizer.encode(text, add_special_tokens=False))
