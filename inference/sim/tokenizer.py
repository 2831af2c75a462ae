"""Deterministic toy tokenizer, chat template and pseudo-text generator.

Nothing here models a real vocabulary; what matters is that the mapping text →
token ids is stable across processes and runs (ids come from BLAKE2b, never
from Python's salted ``hash()``), and that the tokenization of a prefix is a
prefix of the tokenization of the whole. That lets the radix cache and
prefix-aware routers see the same sharing a real model would.

Pieces (GPT-2-like, but simpler):
- a chat special token ``<|name|>``;
- an optional single space followed by a run of word characters (`` hello``);
- an optional single space followed by one punctuation character (`` ,``);
- any other single whitespace character (``\\n``, a second space, a tab).

Generated text is a sequence of pieces, `` word`` from ``OUTPUT_WORDS`` and now
and then ``,``, ``.`` or a line break (``OUTPUT_PUNCTUATION``), drawn by a PRNG
seeded from the prompt, so re-rendering an assistant answer inside the next
chat turn tokenizes back to exactly the ids that were generated.
"""

from __future__ import annotations

import functools
import hashlib
import re
from array import array
from typing import Sequence

from .tools import render_tool_calls, render_tools

# Size of the id space. Ids below RESERVED_IDS are kept for special tokens.
VOCAB_SIZE = 100_000
RESERVED_IDS = 256

BOS_TOKEN_ID = 1
# The id reported as `matched` when a generation stops "naturally" (EOS), the
# way SGLang reports FINISH_MATCHED_TOKEN: {"type":"stop","matched":<eos id>}.
EOS_TOKEN_ID = 2

# Fixed ids for the special tokens (inside RESERVED_IDS): EOS, and the chat template's.
SPECIAL_TOKEN_IDS: dict[str, int] = {
    "<|endoftext|>": EOS_TOKEN_ID,
    "<|system|>": 10,
    "<|user|>": 11,
    "<|assistant|>": 12,
    "<|tool|>": 13,
    "<|developer|>": 14,
    "<|image|>": 15,
    "<|end|>": 16,
}

_PIECE_PATTERN = re.compile(r"<\|[a-z_]+\|>| ?\w+| ?[^\w\s]|\s", re.UNICODE)


# The piece of each id piece_to_id has computed (the first, should two pieces
# share an id), for turning ids back into text; at most this many.
_PIECE_OF_ID: dict[int, str] = {token_id: piece for piece, token_id in SPECIAL_TOKEN_IDS.items()}
_PIECE_OF_ID_MAX = 1 << 18


@functools.lru_cache(maxsize=1 << 17)
def piece_to_id(piece: str) -> int:
    """Stable id of one piece: special ids for known specials, else a hash."""
    token_id = SPECIAL_TOKEN_IDS.get(piece)
    if token_id is None:
        digest = hashlib.blake2b(piece.encode("utf-8"), digest_size=8).digest()
        token_id = RESERVED_IDS + int.from_bytes(digest, "little") % (VOCAB_SIZE - RESERVED_IDS)
    if len(_PIECE_OF_ID) < _PIECE_OF_ID_MAX:
        _PIECE_OF_ID.setdefault(token_id, piece)
    return token_id


def piece_of(token_id: int) -> str:
    """The text of a token id: a piece this process has tokenized or
    generated with that id, else "" (the toy vocabulary cannot say more)."""
    return _PIECE_OF_ID.get(token_id, "")


def detokenize(ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """The text of token ids; `skip_special_tokens` leaves out the special
    tokens (EOS and the chat template's), as a tokenizer's decode does."""
    return "".join(piece_of(token_id) for token_id in ids
                   if not (skip_special_tokens and 0 <= token_id < RESERVED_IDS))


def split_pieces(text: str) -> list[str]:
    """Split text into pieces; ``"".join(split_pieces(t)) == t`` always holds."""
    return _PIECE_PATTERN.findall(text)


def tokenize(text: str) -> list[int]:
    return [piece_to_id(piece) for piece in _PIECE_PATTERN.findall(text)]


# ---------------------------------------------------------------- chat template

def render_message_content(content: object) -> str:
    """Flatten an OpenAI message `content` (string, null or list of parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if not isinstance(part, dict):
                raise ValueError("Each content part must be an object.")
            part_type = part.get("type")
            if part_type == "text":
                texts.append(str(part.get("text", "")))
            else:
                # Media parts have no text to model; keep one placeholder so
                # prompts with and without them differ.
                texts.append("<|image|>")
        return "\n".join(texts)
    raise ValueError("Message content must be a string or a list of content parts.")


def render_chat_prompt(messages: Sequence[dict], tools: object = None) -> str:
    """Render messages with the simulator's fixed template.

    A non-empty `tools` list comes first, as a ``<|tools|>`` block. Each message
    becomes ``<|role|>\\n{content}\\n``, an assistant's earlier `tool_calls`
    written after its content as the model wrote them; the prompt ends with the
    assistant header ``<|assistant|>\\n`` so generation continues from there.
    Identical conversation prefixes therefore render to identical text
    prefixes, and (see module doc) to identical token prefixes.
    """
    parts: list[str] = [render_tools(tools)] if isinstance(tools, list) and tools else []
    for message in messages:
        if not isinstance(message, dict):
            raise ValueError("Each message must be an object.")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError("Each message must have a string 'role'.")
        content = render_message_content(message.get("content"))
        if message.get("tool_calls"):
            content += render_tool_calls(message["tool_calls"])
        parts.append(f"<|{role}|>\n{content}\n")
    parts.append("<|assistant|>\n")
    return "".join(parts)


# ------------------------------------------------------------------ pseudo text

# Output vocabulary: each generated token is " " + one of these words.
OUTPUT_WORDS: tuple[str, ...] = tuple(
    """
    the of and to in is that for it as with was on be by this are or from at
    an which have not has but all were when we there can more their if will
    one about so out up what time only new some could these two may first then
    do any like other than now such into its our most over also after where
    just made well many before must through back years much way should down
    because those people how work each system data model token cache
    request server stream batch prefix router tenant latency memory query
    answer value state result signal kernel vector layer graph node edge
    simple quick bright calm clear deep early fair green light quiet rapid
    small solid steady warm whole young ready plain sharp smooth
    river mountain forest ocean garden window morning evening winter summer
    city road bridge market library station harbor island valley meadow
    """.split()
)

# Punctuation the toy model writes between its words, with how many of the
# draws (out of the words' one each) land on it: a comma or a full stop about
# every 26 tokens each, a line break about every 50, so that replies have
# sentences and lines, and stop strings such as "\n" or "." end them as they
# end a real model's.
OUTPUT_PUNCTUATION: dict[str, int] = {",": 6, ".": 6, "\n": 3}

# Every piece the toy model writes, once each (what logprobs rank)...
_OUTPUT_PIECES: tuple[str, ...] = tuple(" " + word for word in OUTPUT_WORDS) + tuple(OUTPUT_PUNCTUATION)
_OUTPUT_IDS: tuple[int, ...] = tuple(piece_to_id(piece) for piece in _OUTPUT_PIECES)
# ...and as it draws them.
_DRAW_PIECES: tuple[str, ...] = tuple(" " + word for word in OUTPUT_WORDS) + tuple(
    piece for piece, weight in OUTPUT_PUNCTUATION.items() for _ in range(weight))
_DRAW_IDS: tuple[int, ...] = tuple(piece_to_id(piece) for piece in _DRAW_PIECES)

_MASK64 = (1 << 64) - 1


def generation_seed(*, prompt_ids: Sequence[int], server_seed: int, request_seed: int | None) -> int:
    """64-bit PRNG seed from the prompt ids, the server seed and the request's seed."""
    hasher = hashlib.blake2b(digest_size=8)
    hasher.update(server_seed.to_bytes(8, "little", signed=True))
    hasher.update((request_seed if request_seed is not None else -1).to_bytes(8, "little", signed=True))
    hasher.update(array("I", (token_id & 0xFFFFFFFF for token_id in prompt_ids)).tobytes())
    return int.from_bytes(hasher.digest(), "little") or 0x9E3779B97F4A7C15


class PseudoTextSource:
    """Deterministic stream of output tokens (xorshift64* over the words and punctuation)."""

    __slots__ = ("_state",)

    def __init__(self, seed: int) -> None:
        self._state = seed & _MASK64 or 0x9E3779B97F4A7C15

    def next_token(self) -> tuple[int, str]:
        """Return (token id, text piece) of the next generated token."""
        state = self._state
        state ^= state >> 12
        state ^= (state << 25) & _MASK64
        state ^= state >> 27
        self._state = state
        index = ((state * 0x2545F4914F6CDD1D) & _MASK64) >> 33
        index %= len(_DRAW_IDS)
        return _DRAW_IDS[index], _DRAW_PIECES[index]


# A logit bias at least this large (in either direction) decides the toy
# model's choice: its own log probabilities lie within a few nats of each other.
DECISIVE_LOGIT_BIAS = 10.0


class BiasedTextSource:
    """A request's `logit_bias` over the pseudo-text: the token with the
    largest decisive positive bias is chosen at every step (its logit beats
    every other token's, the EOS's too); tokens with a decisive negative bias
    are never chosen; smaller biases change nothing."""

    __slots__ = ("_source", "_forced", "_banned")

    def __init__(self, source: PseudoTextSource, logit_bias: dict[int, float]) -> None:
        self._source = source
        favoured = [(bias, token_id) for token_id, bias in logit_bias.items() if bias >= DECISIVE_LOGIT_BIAS]
        forced = max(favoured)[1] if favoured else None
        self._forced = (forced, piece_of(forced)) if forced is not None else None
        self._banned = frozenset(token_id for token_id, bias in logit_bias.items() if bias <= -DECISIVE_LOGIT_BIAS)

    @staticmethod
    def decisive(logit_bias: dict[int, float] | None) -> bool:
        return bool(logit_bias) and any(abs(bias) >= DECISIVE_LOGIT_BIAS for bias in logit_bias.values())

    @property
    def forces(self) -> bool:
        """A token is forced: the reply never reaches its EOS."""
        return self._forced is not None

    def next_token(self) -> tuple[int, str]:
        if self._forced is not None:
            return self._forced
        for _ in range(4 * len(_OUTPUT_IDS)):
            token_id, piece = self._source.next_token()
            if token_id not in self._banned:
                return token_id, piece
        return piece_to_id(" else"), " else"  # every word it writes banned: one it never writes otherwise


class ScriptedTextSource:
    """Output tokens that spell a given text (a tool call, a constrained
    reply), then `then`'s."""

    __slots__ = ("_pieces", "_next", "_then")

    def __init__(self, text: str, then: PseudoTextSource | BiasedTextSource) -> None:
        self._pieces = split_pieces(text)
        self._next = 0
        self._then = then

    def __len__(self) -> int:
        return len(self._pieces)

    def next_token(self) -> tuple[int, str]:
        if self._next < len(self._pieces):
            piece = self._pieces[self._next]
            self._next += 1
            return piece_to_id(piece), piece
        return self._then.next_token()


def _scored(token_id: int, piece: str, position: int) -> tuple[float, list[str]]:
    """The log probability of the token at `position` (its place in the
    sequence, the prompt's tokens first) and the other output words in the
    order of their likelihood there, each 0.75 below the one before."""
    digest = hashlib.blake2b(f"{token_id}:{position}".encode(), digest_size=8).digest()
    mixed = int.from_bytes(digest, "little")
    start = (mixed >> 16) % len(_OUTPUT_PIECES)
    others = [candidate for candidate in _OUTPUT_PIECES[start:] + _OUTPUT_PIECES[:start] if candidate != piece]
    return -(mixed % 2000) / 1000.0, others


def token_logprobs(token_id: int, piece: str, position: int, top: int) -> dict:
    """OpenAI's logprob entry of the token at `position` of a sequence: a
    deterministic log probability in (-2, 0] for it, and `top` alternatives
    (itself first, then other output words, each less likely than the one
    before). The same token at the same place scores the same, as prompt or
    as output."""
    logprob, others = _scored(token_id, piece, position)
    alternatives = [{"token": piece, "bytes": list(piece.encode()), "logprob": logprob}] if top > 0 else []
    for rank, other in zip(range(1, top), others):
        alternatives.append({"token": other, "bytes": list(other.encode()), "logprob": logprob - 0.75 * rank})
    return {"token": piece, "bytes": list(piece.encode()), "logprob": logprob, "top_logprobs": alternatives}


def queried_logprob(queried_id: int, token_id: int, piece: str, position: int) -> float:
    """The log probability of any token `queried_id` at the position where
    `token_id` stands (SGLang's token_ids_logprob): the token's own, an
    output word's as `token_logprobs` ranks it, any other id's below all of
    those."""
    logprob, others = _scored(token_id, piece, position)
    if queried_id == token_id:
        return logprob
    queried = piece_of(queried_id)
    if queried in others:
        return logprob - 0.75 * (others.index(queried) + 1)
    return logprob - 0.75 * (len(others) + 1) - (queried_id % 1000) / 1000.0


def natural_length(seed: int, low: int, high: int) -> int:
    """A deterministic 'EOS position' in [low, high] for a generation seed.

    Independent of the token stream, so the text of a request is the same
    whether or not it sets max_tokens (only where it ends differs).
    """
    return low + (seed >> 17) % (high - low + 1)
