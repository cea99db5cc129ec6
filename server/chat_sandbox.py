"""Chat templates sent by clients, rendered in a separate process with a time and a memory budget.

Jinja's sandbox stops a template from reaching Python objects, not from looping for ever or building
a huge string, and a thread cannot be stopped. So a client's template renders in a child process
(`python -m fenwick_llm.server.chat_sandbox`, jinja2 only) that is killed when it runs past its time,
caps its address space, and returns at most max_chars characters. One render at a time; the child is
started on first use and again after a kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from typing import Any

from ..engine.chat_template import ChatTemplateError, environment, render

_SANDBOX_MEMORY_BYTES = 1 << 30  # the child's address-space cap (jinja2 and Python need ~50 MB)


class ChatTemplateSandbox:
    def __init__(self, timeout_s: float, max_chars: int) -> None:
        self.timeout_s = timeout_s  # wall-clock budget of one render, start-up of a new child excluded
        self.max_chars = max_chars  # longest rendered prompt
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def _child(self) -> asyncio.subprocess.Process:
        if self._proc is None or self._proc.returncode is not None:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "fenwick_llm.server.chat_sandbox", str(self.max_chars),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL, limit=8 * self.max_chars + (1 << 16))
        return self._proc

    async def render(self, template: str, context: dict[str, Any]) -> str:
        """The rendered text; ChatTemplateError when the template fails or passes its budget."""
        request = json.dumps({"template": template, "context": context}).encode() + b"\n"
        async with self._lock:
            proc = await self._child()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(request)
                await proc.stdin.drain()
                line = await asyncio.wait_for(proc.stdout.readline(), self.timeout_s)
            except (TimeoutError, asyncio.TimeoutError):
                self._kill()
                budget = f"{self.timeout_s:g} s"
                raise ChatTemplateError(f"the chat template ran past its {budget} budget") from None
            except (ConnectionError, ValueError):  # the child died (memory cap) or replied too much
                self._kill()
                raise ChatTemplateError("the chat template ran past its memory budget") from None
            except BaseException:  # cancelled (client gone): its reply must not answer the next render
                self._kill()
                raise
            if not line:
                self._kill()
                raise ChatTemplateError("the chat template ran past its memory budget")
        reply = json.loads(line)
        if "error" in reply:
            raise ChatTemplateError(reply["error"])
        return str(reply["text"])

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.kill()  # the event loop's child watcher reaps it

    async def close(self) -> None:
        proc = self._proc
        self._kill()
        if proc is not None:
            await proc.wait()


def _serve(max_chars: int) -> None:
    """The child: one JSON request per line in, one JSON reply per line out."""
    import resource

    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (_SANDBOX_MEMORY_BYTES, _SANDBOX_MEMORY_BYTES))
    env = environment()
    for line in sys.stdin:
        try:
            request = json.loads(line)
            context = request["context"]
            text = render(env.from_string(request["template"]), context.pop("messages"),
                          context.pop("add_generation_prompt"), context.pop("bos_token"),
                          context.pop("eos_token"), max_chars=max_chars, **context)
            reply: dict[str, str] = {"text": text}
        except MemoryError:
            reply = {"error": "the chat template ran past its memory budget"}
        except Exception as e:
            reply = {"error": str(e) if isinstance(e, ChatTemplateError) else f"chat template failed: {e}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
