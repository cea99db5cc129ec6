"""The Jinja environment chat templates render in, with Hugging Face's conventions (``trim_blocks``,
``lstrip_blocks``, ``raise_exception``, ``tojson``, ``strftime_now``). A leaf module (only jinja2), so
the server's template sandbox process can import it without torch or tokenizers."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# variables the renderer sets itself: a request's chat_template_kwargs may not replace them
RESERVED_VARIABLES = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token",
                                "chat_template", "raise_exception", "strftime_now"})


class ChatTemplateError(ValueError):
    """The chat template raised (``raise_exception``) or failed to render."""


def _tojson(x: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(x, ensure_ascii=False, indent=indent)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def render(template: Any, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool,
           bos_token: str, eos_token: str, max_chars: int | None = None, **kwargs: Any) -> str:
    """Render a compiled template; ChatTemplateError when it fails or its output passes max_chars."""
    context = dict(kwargs, messages=list(messages), add_generation_prompt=add_generation_prompt,
                   bos_token=bos_token, eos_token=eos_token)
    try:
        pieces: list[str] = []
        size = 0
        for piece in template.generate(**context):
            size += len(piece)
            if max_chars is not None and size > max_chars:
                raise ChatTemplateError(f"the rendered prompt exceeds {max_chars} characters")
            pieces.append(piece)
        return "".join(pieces)
    except ChatTemplateError:
        raise
    except (TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as e:
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
