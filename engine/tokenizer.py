"""Tokenizer: ``tokenizers.Tokenizer`` from tokenizer.json, special tokens and the chat template.

The chat template comes from tokenizer_config.json (``chat_template``, a Jinja string or a list of named
templates, of which ``default`` is used) and is rendered in a sandboxed Jinja environment with HF's
conventions (engine/chat_template.py).
Without one, a plain template is used: each message as ``<|role|>\\ncontent\\n``, then ``<|assistant|>\\n``
when a generation prompt is asked for.
"""

from __future__ import annotations

import functools
import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers

from .chat_template import PLAIN_CHAT_TEMPLATE, ChatTemplateError, environment, render

__all__ = ["PLAIN_CHAT_TEMPLATE", "ChatTemplateError", "Tokenizer"]
TEMPLATE_CACHE_SIZE = 8  # compiled templates kept (the model's, the plain one, a few passed in)


def _token_content(tok: Any) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


class Tokenizer:
    def __init__(self, tokenizer: tokenizers.Tokenizer, *, chat_template: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None,
                 eos_token_id: int | None = None, bos_token_id: int | None = None,
                 tokenizer_config: dict[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.tokenizer_config = dict(tokenizer_config or {})
        self.bos_token = bos_token
        self.eos_token = eos_token
        by_name = tokenizer.token_to_id(bos_token) if bos_token is not None else None
        self.bos_token_id = by_name if by_name is not None else bos_token_id
        by_name = tokenizer.token_to_id(eos_token) if eos_token is not None else None
        self.eos_token_id = by_name if by_name is not None else eos_token_id
        if self.eos_token is None and self.eos_token_id is not None:
            self.eos_token = tokenizer.id_to_token(self.eos_token_id)
        if self.bos_token is None and self.bos_token_id is not None:
            self.bos_token = tokenizer.id_to_token(self.bos_token_id)
        self._template_cache: OrderedDict[str, Any] = OrderedDict()  # source -> compiled, least recent first

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """tokenizer.json (required), tokenizer_config.json, then config.json / generation_config.json ids."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer not found: {path}")
        tok = tokenizers.Tokenizer.from_file(str(path))
        cfg = _read_json(model_dir / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default", next(iter(named.values()), None))
        if template is None and (model_dir / "chat_template.jinja").is_file():
            template = (model_dir / "chat_template.jinja").read_text()
        ids: dict[str, Any] = {}
        for name in ("config.json", "generation_config.json"):  # the latter wins
            d = _read_json(model_dir / name)
            ids.update({k: d[k] for k in ("eos_token_id", "bos_token_id") if d.get(k) is not None})
        eos_id = ids.get("eos_token_id")
        if isinstance(eos_id, list):
            eos_id = eos_id[0] if eos_id else None
        return cls(tok, chat_template=template, bos_token=_token_content(cfg.get("bos_token")),
                   eos_token=_token_content(cfg.get("eos_token")), eos_token_id=eos_id,
                   bos_token_id=ids.get("bos_token_id"), tokenizer_config=cfg)

    # ---- encoding ---------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; with add_special_tokens, tokenizer_config's add_bos_token / add_eos_token apply when
        tokenizer.json's post-processor does not add them already."""
        # encode_batch lets go of the GIL (encode holds it: seconds for a megabyte of text)
        ids = self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens:
            bos, eos = self.bos_token_id, self.eos_token_id
            if self.tokenizer_config.get("add_bos_token") and bos is not None and ids[:1] != [bos]:
                ids.insert(0, bos)
            if self.tokenizer_config.get("add_eos_token") and eos is not None and ids[-1:] != [eos]:
                ids.append(eos)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.tokenizer.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """Characters of the longest vocabulary entry: no token decodes to more (byte-level entries hold
        one character per byte), so a text longer than n times this has more than n tokens."""
        return max((len(t) for t in self.tokenizer.get_vocab(with_added_tokens=True)), default=1)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        special = {i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        special.update(i for i in (self.bos_token_id, self.eos_token_id) if i is not None)
        return sorted(special)

    # ---- chat -------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            chat_template: str | None = None, max_chars: int | None = None,
                            **kwargs: Any) -> str:
        """Render messages ([{"role", "content"}, ...]) with the model's template (or the plain one);
        ChatTemplateError when it fails or renders more than max_chars."""
        source = chat_template or self.chat_template or PLAIN_CHAT_TEMPLATE
        template = self._template_cache.get(source)
        if template is None:
            try:
                template = environment().from_string(source)
            except Exception as e:
                raise ChatTemplateError(f"chat template failed: {e}") from e
            self._template_cache[source] = template
            while len(self._template_cache) > TEMPLATE_CACHE_SIZE:
                self._template_cache.popitem(last=False)
        self._template_cache.move_to_end(source)
        return render(template, messages, add_generation_prompt, self.bos_token or "", self.eos_token or "",
                      max_chars=max_chars, **kwargs)

    def save(self, out_dir: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (chat template, bos / eos tokens)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(out_dir / "tokenizer.json"))
        cfg = dict(self.tokenizer_config)
        for key, value in (("chat_template", self.chat_template), ("bos_token", self.bos_token),
                           ("eos_token", self.eos_token)):
            if value is not None:
                cfg[key] = value
        (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
