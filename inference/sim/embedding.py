"""An embedding model (`--is-embedding`): SGLang's POST /v1/embeddings.

Request and reply follow SGLang's OpenAI layer (`serving_embedding.py`):
- `input`: a string, a list of strings, a list of token ids, or a list of
  token-id lists; empty or whitespace-only inputs and negative ids are refused
  with its messages;
- the reply is `{"data": [{"embedding", "index", "object": "embedding"}],
  "model": <model path>, "object": "list", "usage"}` with the prompt tokens of
  all inputs as both `prompt_tokens` and `total_tokens`; vectors are floats,
  or with `encoding_format` "base64" the base64 of their little-endian
  float32 values (any other format is refused);
- `dimensions` keeps the first N dimensions, renormalised, on a Matryoshka
  model (`--json-model-override-args '{"is_matryoshka": true}'`, or
  `matryoshka_dimensions` listing the sizes it allows); other models refuse
  it, with the tokenizer manager's checks and messages.

A vector is the feature hash of the input's token ids (a signed count per
dimension), normalised to unit length: deterministic, and texts that share
tokens point the same way. Computing it costs a prefill of the input.
"""
from __future__ import annotations

import base64
import math
import struct
from dataclasses import dataclass
from typing import Any

from .protocol import openai_error, openai_schema_error
from .tokenizer import tokenize

# Knuth's multiplicative hash constant: spreads consecutive token ids.
_HASH_MULTIPLIER = 2654435761


@dataclass(frozen=True, slots=True)
class EmbeddingInput:
    inputs: list[list[int]]  # token ids of each input, in order
    dimensions: int | None
    encoding_format: str = "float"


def parse_embedding_request(body: Any, *, dim: int, model_path: str = "", is_matryoshka: bool = False,
                            matryoshka_dimensions: tuple[int, ...] | None = None) -> EmbeddingInput:
    if not isinstance(body, dict):
        raise openai_schema_error("body", "Input should be a valid dictionary", "EmbeddingRequest")
    if "input" not in body:
        raise openai_schema_error("input", "Field required", "EmbeddingRequest")
    encoding_format = body.get("encoding_format", "float")
    if encoding_format not in ("float", "base64"):
        raise openai_error(f"encoding_format must be either 'float' or 'base64', got {encoding_format!r}")
    value = body["input"]
    if not value:
        raise openai_error("Input cannot be empty")
    if isinstance(value, str):
        if not value.strip():
            raise openai_error("Input cannot be empty or whitespace only")
        inputs = [tokenize(value)]
    elif isinstance(value, list):
        first = value[0]
        if isinstance(first, str):
            for index, item in enumerate(value):
                if not isinstance(item, str):
                    raise openai_error("All items in input list must be strings")
                if not item.strip():
                    raise openai_error(f"Input at index {index} cannot be empty or whitespace only")
            inputs = [tokenize(item) for item in value]
        elif isinstance(first, int) and not isinstance(first, bool):
            for index, item in enumerate(value):
                if not isinstance(item, int) or isinstance(item, bool):
                    raise openai_error("All items in input list must be integers")
                if item < 0:
                    raise openai_error(f"Token ID at index {index} must be non-negative")
            inputs = [list(value)]
        elif isinstance(first, list):
            for index, item in enumerate(value):
                if not isinstance(item, list):
                    raise openai_error(f"Input at index {index} must be a list")
                if not item:
                    raise openai_error(f"Input at index {index} cannot be empty")
                if not all(isinstance(token, int) and not isinstance(token, bool) for token in item):
                    raise openai_error(f"Input at index {index} must contain only integers")
                if any(token < 0 for token in item):
                    raise openai_error(f"Input at index {index} contains negative token IDs")
            inputs = [list(item) for item in value]
        else:
            raise openai_schema_error("input", "Input should be a valid string or list", "EmbeddingRequest")
    else:
        raise openai_schema_error("input", "Input should be a valid string or list", "EmbeddingRequest")
    dimensions = body.get("dimensions")
    if dimensions is not None:
        if not isinstance(dimensions, int) or isinstance(dimensions, bool):
            raise openai_schema_error("dimensions", "Input should be a valid integer", "EmbeddingRequest")
        # The tokenizer manager's _validate_for_matryoshka_dim, in its order.
        if not is_matryoshka:
            raise openai_error(f"Model '{model_path}' does not support matryoshka representation, "
                               "changing output dimensions will lead to poor results.")
        if dimensions < 1:
            raise openai_error("Requested dimensions must be greater than 0")
        if matryoshka_dimensions and dimensions not in matryoshka_dimensions:
            raise openai_error(f"Model '{model_path}' only supports {list(matryoshka_dimensions)} matryoshka "
                               "dimensions, using other output dimensions will lead to poor results.")
        if dimensions > dim:
            raise openai_error(f"Provided dimensions are greater than max embedding dimension: {dim}")
    return EmbeddingInput(inputs, dimensions, encoding_format)


def embedding_vector(token_ids: list[int], *, dim: int, seed: int = 0, dimensions: int | None = None) -> list[float]:
    """The unit vector of `token_ids`: each id adds ±1 to the dimension its hash picks."""
    vector = [0.0] * dim
    for token in token_ids:
        mixed = ((token + 1) * _HASH_MULTIPLIER + seed) & 0xFFFFFFFF
        vector[mixed % dim] += 1.0 if (mixed >> 16) & 1 else -1.0
    if dimensions is not None:
        vector = vector[:dimensions]
    norm = math.sqrt(sum(x * x for x in vector))
    if norm == 0.0:  # every count cancelled out (or was cut off): a fixed unit vector
        return [1.0] + [0.0] * (len(vector) - 1)
    return [x / norm for x in vector]


def embedding_response(vectors: list[list[float]], *, model: str, prompt_tokens: int,
                       encoding_format: str = "float") -> dict:
    return {
        "data": [{"embedding": _serialized(vector, encoding_format), "index": index, "object": "embedding"}
                 for index, vector in enumerate(vectors)],
        "model": model,
        "object": "list",
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0,
                  "prompt_tokens_details": None, "reasoning_tokens": 0, "completion_tokens_details": None},
    }


def _serialized(vector: list[float], encoding_format: str) -> list[float] | str:
    """A vector as the request asked: floats, or base64 of little-endian float32s."""
    if encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
