"""`POST /tokenize` and `/detokenize` (and their `/v1/` twins), as sglang
0.5.23's `serving_tokenize.py` answers them, over the simulator's tokenizer.

- tokenize: exactly one of `prompt` (a string or a list of them) and
  `messages` (rendered as a chat completion renders them, `tools` included);
  the answer is `{tokens, count, max_model_len}`, lists for a list prompt.
  The toy tokenizer adds no special tokens, so `add_special_tokens` changes
  nothing.
- detokenize: `tokens` a list of ids or of id lists; `skip_special_tokens`
  (default true) leaves out the chat template's special tokens. The toy
  vocabulary can name only the ids this process has tokenized or generated;
  any other id decodes to nothing.

Errors are the OpenAI routes' flat ones: a schema violation is a 400 "Bad
Request", a message that cannot be rendered a 400 "BadRequestError".
"""

from __future__ import annotations

from typing import Any

from .protocol import ApiError, _Fields, chat_messages_checked, openai_error, openai_error_body, openai_schema_error
from .tokenizer import detokenize, render_chat_prompt, tokenize
from .tools import template_tools


def tokenize_response(body: Any, *, context_length: int) -> dict:
    fields = _Fields(body, "TokenizeRequest", openai_schema_error)
    prompt, messages = body.get("prompt"), body.get("messages")
    if (prompt is None) == (messages is None):
        # A model validator's ValueError, as pydantic words it.
        raise ApiError(400, openai_error_body(
            "1 validation error for TokenizeRequest\n  Value error, Exactly one of 'prompt' or 'messages' "
            "must be provided.", error_type="Bad Request"))
    if messages is not None:
        if not isinstance(messages, list):
            fields.fail("messages", "Input should be a valid list")
        messages = chat_messages_checked(messages, "TokenizeRequest")
        try:
            ids = tokenize(render_chat_prompt(messages, template_tools(body.get("tools"), body.get("tool_choice"))))
        except ValueError as error:
            raise openai_error(str(error)) from error
        return {"tokens": ids, "count": len(ids), "max_model_len": context_length}
    if isinstance(prompt, str):
        ids = tokenize(prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": context_length}
    if isinstance(prompt, list) and all(isinstance(text, str) for text in prompt):
        lists = [tokenize(text) for text in prompt]
        return {"tokens": lists, "count": [len(ids) for ids in lists], "max_model_len": context_length}
    fields.fail("prompt", "Input should be a valid string")
    raise AssertionError("unreachable")


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, int) and not isinstance(item, bool) for item in value)


def _decodable(ids: list[int]) -> None:
    """A negative id makes a Hugging Face fast tokenizer's decode raise, which
    SGLang's route answers as a 500; ids past the vocabulary decode to nothing."""
    if any(token_id < 0 for token_id in ids):
        raise ApiError(500, openai_error_body(
            "Internal server error during detokenization: out of range integral type conversion attempted",
            error_type="InternalServerError", code=500))


def detokenize_response(body: Any) -> dict:
    fields = _Fields(body, "DetokenizeRequest", openai_schema_error)
    if "tokens" not in body:
        fields.fail("tokens", "Field required")
    tokens = body["tokens"]
    skip_special = fields.boolean("skip_special_tokens") if "skip_special_tokens" in body else True
    if tokens == []:
        return {"text": ""}
    if _is_ids(tokens):
        _decodable(tokens)
        return {"text": detokenize(tokens, skip_special)}
    if isinstance(tokens, list) and all(_is_ids(item) for item in tokens):
        for item in tokens:
            _decodable(item)
        return {"text": [detokenize(item, skip_special) for item in tokens]}
    fields.fail("tokens", "Input should be a list of integers or a list of lists of integers")
    raise AssertionError("unreachable")
