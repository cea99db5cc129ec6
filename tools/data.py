"""Text data for the training recipe: the held-out split, the byte-level BPE tokenizer, chat rendering,
and random training windows over token streams."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, "<|system|>", "<|user|>", "<|assistant|>", PAD]

# Each turn is `<|role|>\n{content}<|endoftext|>\n`; the prompt for a reply ends with `<|assistant|>\n`.
# With tools (docs/structured-outputs.md), a first system turn lists them as JSON inside <tools></tools>
# (after the system message's own content, which it replaces); an assistant turn's calls are blocks
# `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>` joined by newlines, after its text; a
# "tool" turn (a call's result) is a user turn `<tool_response>\n{content}\n</tool_response>`.
TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
    "with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_INSTRUCTION = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|system|>\\n' }}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{{ " + repr(TOOLS_PREAMBLE) + " }}"
    "{% for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}"
    "{{ " + repr(TOOLS_INSTRUCTION + EOS + "\n") + " }}{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|user|>\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|endoftext|>\\n' }}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{ '<|assistant|>\\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] %}"
    "{% if not loop.first or message['content'] %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_call>\\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' }}"
    "{% if call['function']['arguments'] is string %}{{ call['function']['arguments'] }}"
    "{% else %}{{ call['function']['arguments'] | tojson }}{% endif %}"
    "{{ '}\\n</tool_call>' }}"
    "{% endfor %}{{ '<|endoftext|>\\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|endoftext|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def render_chat(messages: list[dict], add_generation_prompt: bool = False,
                tools: list[dict] | None = None) -> str:
    """Python twin of CHAT_TEMPLATE (the tests check that both agree)."""
    text = ""
    if tools:
        system = messages[0]["content"] + "\n\n" if messages and messages[0]["role"] == "system" else ""
        listed = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
        text = f"<|system|>\n{system}{TOOLS_PREAMBLE}{listed}{TOOLS_INSTRUCTION}{EOS}\n"
    for i, m in enumerate(messages):
        if tools and i == 0 and m["role"] == "system":
            continue
        if m["role"] == "tool":
            text += f"<|user|>\n<tool_response>\n{m['content']}\n</tool_response>{EOS}\n"
        elif m["role"] == "assistant" and m.get("tool_calls"):
            content = m.get("content") or ""
            calls = []
            for call in m["tool_calls"]:
                name, args = call["function"]["name"], call["function"]["arguments"]
                args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                calls.append(f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>')
            sep = "\n" if content else ""
            text += f"<|assistant|>\n{content}{sep}" + "\n".join(calls) + f"{EOS}\n"
        else:
            text += f"<|{m['role']}|>\n{m['content']}{EOS}\n"
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """(train, val): the last ``val_fraction`` of the characters are held out."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(text) * (1.0 - val_fraction))
    return text[:cut], text[cut:]


def train_tokenizer(text: str, vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE (GPT-2 style: lossless on any text) with SPECIAL_TOKENS at ids 0.. in order."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    lines = text.splitlines(keepends=True)
    tok.train_from_iterator(("".join(lines[i:i + 256]) for i in range(0, len(lines), 256)), trainer)
    return tok


def tokenizer_config(tok: Tokenizer, model_max_length: int) -> dict:
    """tokenizer_config.json in the Hugging Face shape, with the chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                       "normalized": False, "single_word": False}
            for t in SPECIAL_TOKENS
        },
    }


def save_tokenizer(tok: Tokenizer, out_dir: Path, model_max_length: int) -> None:
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = tokenizer_config(tok, model_max_length)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def speeches(text: str) -> list[str]:
    """Blocks of a play script (`NAME:\\nlines...`, blank-line separated) without the speaker line."""
    out = []
    for block in text.split("\n\n"):
        lines = block.strip("\n").split("\n")
        if len(lines) >= 2 and lines[0].endswith(":"):
            out.append("\n".join(lines[1:]))
        elif lines and lines[0]:
            out.append("\n".join(lines))
    return out


def chat_documents(text: str, turns: int = 4) -> Iterator[str]:
    """Consecutive speeches rendered as chats: odd speeches are the user's, even ones the assistant's."""
    sp = speeches(text)
    roles = ("user", "assistant")
    for i in range(0, len(sp) - turns + 1, turns):
        yield render_chat([{"role": roles[j % 2], "content": sp[i + j]} for j in range(turns)])


def encode(tok: Tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as one stream, int64 [N]; special tokens in the text are recognised.

    Encoded in pieces of whole lines (so that no special token is cut) for the tokenizer's parallelism.
    """
    lines = text.splitlines(keepends=True)
    pieces, cur, size = [], [], 0
    for line in lines:
        cur.append(line)
        size += len(line)
        if size >= 65536:
            pieces.append("".join(cur))
            cur, size = [], 0
    if cur:
        pieces.append("".join(cur))
    enc = tok.encode_batch(pieces) if pieces else []
    return torch.tensor([i for e in enc for i in e.ids], dtype=torch.int64)


@dataclass
class WindowSampler:
    """Random windows of ``seq_len + 1`` tokens from one of several streams, chosen by weight."""

    streams: list[torch.Tensor]  # each [N_i] int64, on the training device
    weights: list[float]
    seq_len: int

    def __post_init__(self) -> None:
        for s in self.streams:
            if s.numel() < self.seq_len + 2:
                raise ValueError(f"a token stream of {s.numel()} tokens is too short for seq_len "
                                 f"{self.seq_len}")
        w = torch.tensor(self.weights, dtype=torch.float64)
        self._probs = w / w.sum()
        self._cat = torch.cat(self.streams)
        self._lens = torch.tensor([s.numel() for s in self.streams])
        self._offsets = torch.cumsum(self._lens, 0) - self._lens

    def __call__(self, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), both [B, seq_len] on the streams' device."""
        T = self.seq_len
        which = torch.multinomial(self._probs, batch_size, replacement=True, generator=gen)  # (B,)
        room = (self._lens[which] - T - 1).double()
        u = torch.rand(batch_size, generator=gen, dtype=torch.float64)
        start = self._offsets[which] + (u * room).long()
        idx = start[:, None] + torch.arange(T + 1)  # (B, T + 1)
        x = self._cat[idx.to(self._cat.device)]
        return x[:, :-1], x[:, 1:]


def eval_windows(stream: torch.Tensor, seq_len: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows covering the stream: every token but the first is predicted exactly once."""
    n = stream.numel()
    for a in range(0, n - 1, seq_len):
        b = min(a + seq_len + 1, n)
        yield stream[a:b - 1][None], stream[a + 1:b][None]
