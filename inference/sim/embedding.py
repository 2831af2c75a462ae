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

from .protocol import WEIGHT_VERSION, native_error, new_rid, openai_error, openai_schema_error
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
    if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool)):
        raise openai_schema_error("dimensions", "Input should be a valid integer", "EmbeddingRequest")
    try:
        dimensions_check(dimensions, dim=dim, model_path=model_path, is_matryoshka=is_matryoshka,
                         matryoshka_dimensions=matryoshka_dimensions)
    except ValueError as error:
        raise openai_error(str(error)) from error
    return EmbeddingInput(inputs, dimensions, encoding_format)


def dimensions_check(dimensions: int | None, *, dim: int, model_path: str, is_matryoshka: bool,
                     matryoshka_dimensions: tuple[int, ...] | None) -> None:
    """The tokenizer manager's _validate_for_matryoshka_dim, in its order and
    words: raises ValueError for `dimensions` the model cannot give."""
    if dimensions is None:
        return
    if not is_matryoshka:
        raise ValueError(f"Model '{model_path}' does not support matryoshka representation, "
                         "changing output dimensions will lead to poor results.")
    if dimensions < 1:
        raise ValueError("Requested dimensions must be greater than 0")
    if matryoshka_dimensions and dimensions not in matryoshka_dimensions:
        raise ValueError(f"Model '{model_path}' only supports {list(matryoshka_dimensions)} matryoshka "
                         "dimensions, using other output dimensions will lead to poor results.")
    if dimensions > dim:
        raise ValueError(f"Provided dimensions are greater than max embedding dimension: {dim}")


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


@dataclass(frozen=True, slots=True)
class EncodeInput:
    """A native POST /encode (SGLang's EmbeddingReqInput): one prompt given as
    such (`single`: the reply is one object) or a batch, each with its rid."""

    inputs: list[list[int]]
    rids: list[str]
    single: bool
    dimensions: int | None


def parse_encode_request(body: Any, *, dim: int, model_path: str, is_matryoshka: bool,
                         matryoshka_dimensions: tuple[int, ...] | None) -> EncodeInput:
    if not isinstance(body, dict):
        raise native_error("body: Input should be a valid dictionary")
    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise native_error("Either text, input_ids or input_embeds should be provided.")
    if text is not None:
        single = isinstance(text, str)
        texts = [text] if single else text
        if not isinstance(texts, list) or not texts or not all(isinstance(item, str) for item in texts):
            raise native_error("text: Input should be a valid string or list of strings")
        inputs = [tokenize(item) for item in texts]
    else:
        single = bool(input_ids) and not isinstance(input_ids[0], list) if isinstance(input_ids, list) else False
        lists = [input_ids] if single else input_ids
        if not isinstance(lists, list) or not lists or not all(
                isinstance(ids, list) and ids and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                      for t in ids) for ids in lists):
            raise native_error("input_ids: Input should be a list of token ids or of token-id lists")
        inputs = [list(ids) for ids in lists]
    rid = body.get("rid")
    if single:
        rids = [rid if isinstance(rid, str) else new_rid()]
    elif isinstance(rid, list) and len(rid) == len(inputs) and all(isinstance(item, str) for item in rid):
        rids = list(rid)
    elif isinstance(rid, str):
        rids = [f"{rid}_{index}" for index in range(len(inputs))]
    else:
        rids = [new_rid() for _ in inputs]
    dimensions = body.get("dimensions")
    if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool)):
        raise native_error("dimensions: Input should be a valid integer")
    try:
        dimensions_check(dimensions, dim=dim, model_path=model_path, is_matryoshka=is_matryoshka,
                         matryoshka_dimensions=matryoshka_dimensions)
    except ValueError as error:
        raise native_error(str(error)) from error
    return EncodeInput(inputs, rids, single, dimensions)


def encode_output(vector: list[float], *, rid: str, prompt_tokens: int, e2e_latency: float,
                  weight_version: str = WEIGHT_VERSION) -> dict:
    """One /encode result, as SGLang's tokenizer manager builds it for an
    embedding: the vector and a meta_info without generation counts (an
    embedding ends after its prefill, as a reply of length 0)."""
    return {"embedding": vector, "meta_info": {
        "id": rid, "finish_reason": {"type": "length", "length": 0}, "prompt_tokens": prompt_tokens,
        "weight_version": weight_version, "num_retractions": 0, "e2e_latency": e2e_latency}}
