"""Reasoning models: the think block a reply opens with, and SGLang's split of
it into `reasoning_content` (`--reasoning-parser`).

Two parsers, as sglang 0.5.23's `srt/parser/reasoning_parser.py` has them:
- `deepseek-r1`: the chat template opens `<think>`, so the model writes its
  reasoning, `</think>`, then the answer; everything before `</think>` is
  reasoning (the detector starts inside the block);
- `qwen3`: the model writes `<think>` itself, unless the request's
  `chat_template_kwargs` set `enable_thinking` to false, and then answers
  without thinking; the block also ends at a `<tool_call>`.
A request's `separate_reasoning: false` leaves the block in `content`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .tokenizer import PseudoTextSource, split_pieces

REASONING_PARSERS = ("deepseek-r1", "qwen3")
THINK_START = "<think>"
THINK_END = "</think>"
# Words of reasoning a thinking reply writes, before its answer.
REASONING_WORDS = (8, 40)


@dataclass(frozen=True, slots=True)
class Thinking:
    """How a chat request's reply thinks: the block the model writes first,
    how many of its tokens SGLang counts as reasoning (through the end tag),
    and how the parser splits the reply (None: it does not)."""

    preamble: str
    reasoning_tokens: int
    parser: str | None


def thinking_for(parser: str | None, body: dict, seed: int) -> Thinking | None:
    """The think block of a chat request's reply under `parser`, or None when
    the reply does not think. `seed` draws the reasoning's words."""
    if parser is None:
        return None
    kwargs = body.get("chat_template_kwargs")
    if parser == "qwen3" and isinstance(kwargs, dict) and kwargs.get("enable_thinking") is False:
        return None
    source = PseudoTextSource(seed ^ 0x5EA5_0417)
    count = REASONING_WORDS[0] + seed % (REASONING_WORDS[1] - REASONING_WORDS[0] + 1)
    words = "".join(source.next_token()[1] for _ in range(count)).lstrip()
    opening = THINK_START + "\n" if parser == "qwen3" else ""
    block = opening + words + "\n" + THINK_END
    separate = body.get("separate_reasoning", True) is not False
    return Thinking(preamble=block + "\n\n", reasoning_tokens=len(split_pieces(block)),
                    parser=parser if separate else None)


class ReasoningSplitter:
    """SGLang's reasoning detector for one choice (the base detector's rules):
    `feed` each streamed delta, `finish` at the end; `split` a whole reply at
    once. Returns (reasoning, normal) text. Without `stream` (a request's
    `stream_reasoning: false`), `feed` holds the reasoning back until the
    block ends and gives it whole; `finish` gives a block cut short."""

    __slots__ = ("_parser", "_stream", "_buffer", "_in_reasoning", "_stripped_start")

    def __init__(self, parser: str, *, stream: bool = True) -> None:
        self._parser = parser
        self._stream = stream
        self._buffer = ""
        # deepseek-r1 starts inside the block; qwen3 once it sees <think>.
        self._in_reasoning = parser == "deepseek-r1"
        self._stripped_start = False

    @property
    def _tool_start(self) -> str | None:
        return "<tool_call>" if self._parser == "qwen3" else None

    def split(self, text: str) -> tuple[str, str]:
        """A whole reply: the reasoning before `</think>` (a leading `<think>`
        dropped), the rest as the answer; a block never closed is all
        reasoning (the reply was cut short)."""
        if not (self._in_reasoning or THINK_START in text):
            return "", text
        while text.startswith(THINK_START):
            text = text[len(THINK_START):]
        if THINK_END in text:
            reasoning, _, normal = text.partition(THINK_END)
            return reasoning, normal
        tool = text.find(self._tool_start) if self._tool_start else -1
        if tool >= 0:
            return text[:tool], text[tool:]
        return text, ""

    def feed(self, delta: str) -> tuple[str, str]:
        self._buffer += delta
        text = self._buffer
        markers = [THINK_START, THINK_END] + ([self._tool_start] if self._tool_start else [])
        if any(marker.startswith(text) and marker != text for marker in markers):
            return "", ""  # maybe the start of a marker: wait for more
        if not self._stripped_start and THINK_START in text:
            text = self._buffer = text.replace(THINK_START, "", 1)
            self._stripped_start = self._in_reasoning = True
        if self._in_reasoning and THINK_END in text:
            reasoning, _, normal = text.partition(THINK_END)
            self._buffer, self._in_reasoning = "", False
            return reasoning, normal
        if self._in_reasoning:
            tool = text.find(self._tool_start) if self._tool_start else -1
            if tool >= 0:
                self._buffer, self._in_reasoning = "", False
                return text[:tool], text[tool:]
            if not self._stream:
                self._buffer = text
                return "", ""
            # Hold back an end that may be a marker split across deltas (the
            # opening one too while it has not been seen).
            held = max(_partial_suffix(text, marker) for marker in markers
                       if marker != THINK_START or not self._stripped_start)
            self._buffer = text[len(text) - held:]
            return text[:len(text) - held], ""
        self._buffer = ""
        return "", text

    def finish(self) -> tuple[str, str]:
        """What is still held back when the reply ends."""
        rest, self._buffer = self._buffer, ""
        return (rest, "") if self._in_reasoning else ("", rest)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a strict prefix of `marker`."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
