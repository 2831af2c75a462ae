"""Unit tests of the simulator's tokenizer, chat template and pseudo-text."""

from __future__ import annotations

import subprocess
import sys

import pytest

from inference.sim.tokenizer import (
    EOS_TOKEN_ID,
    OUTPUT_PUNCTUATION,
    OUTPUT_WORDS,
    RESERVED_IDS,
    VOCAB_SIZE,
    PseudoTextSource,
    generation_seed,
    natural_length,
    render_chat_prompt,
    split_pieces,
    tokenize,
)

from .sim_process import REPO_ROOT


def test_pieces_round_trip_the_text():
    text = "Hello, world!\n\n  Ünïcode  tabs\tand <|user|> specials."
    assert "".join(split_pieces(text)) == text


def test_ids_are_in_range_and_deterministic():
    ids = tokenize("the quick brown fox, jumps")
    assert ids == tokenize("the quick brown fox, jumps")
    assert all(RESERVED_IDS <= token_id < VOCAB_SIZE for token_id in ids)
    assert len(ids) == 6


def test_ids_are_stable_across_processes():
    # str hashing is salted per process; our ids must not be
    code = "from inference.sim.tokenizer import tokenize; print(tokenize('stable ids across processes'))"
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO_ROOT)}, cwd=REPO_ROOT).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1
    assert outputs.pop().strip() == str(tokenize("stable ids across processes"))


def test_chat_prefixes_tokenize_to_prefixes():
    turn_one = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    first_prompt = tokenize(render_chat_prompt(turn_one))

    source = PseudoTextSource(generation_seed(prompt_ids=first_prompt, server_seed=0, request_seed=None))
    generated = [source.next_token() for _ in range(5)]
    answer_text = "".join(piece for _, piece in generated)
    answer_ids = [token_id for token_id, _ in generated]

    turn_two = turn_one + [{"role": "assistant", "content": answer_text},
                           {"role": "user", "content": "And then?"}]
    second_prompt = tokenize(render_chat_prompt(turn_two))
    # the previous prompt + generated answer is a prefix of the next prompt
    assert second_prompt[:len(first_prompt) + len(answer_ids)] == first_prompt + answer_ids


def test_content_parts_are_flattened():
    as_string = render_chat_prompt([{"role": "user", "content": "a\nb"}])
    as_parts = render_chat_prompt([{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                  {"type": "text", "text": "b"}]}])
    assert as_string == as_parts


def test_bad_messages_raise_value_error():
    with pytest.raises(ValueError):
        render_chat_prompt([{"content": "no role"}])
    with pytest.raises(ValueError):
        render_chat_prompt([{"role": "user", "content": 5}])


def test_pseudo_text_is_deterministic_per_seed():
    first = PseudoTextSource(123)
    second = PseudoTextSource(123)
    other = PseudoTextSource(124)
    a = [first.next_token() for _ in range(20)]
    assert a == [second.next_token() for _ in range(20)]
    assert a != [other.next_token() for _ in range(20)]
    assert all(tokenize(piece) == [token_id] for token_id, piece in a)
    assert all(piece.startswith(" ") or piece in OUTPUT_PUNCTUATION for _, piece in a)
    assert EOS_TOKEN_ID not in [token_id for token_id, _ in a]


def test_pseudo_text_has_sentences_and_lines_that_tokenize_back():
    """Commas, full stops and line breaks come between the words, about as
    often as OUTPUT_PUNCTUATION weighs them, and a reply's text tokenizes back
    to the ids generated (a later turn finds it in the cache)."""
    source = PseudoTextSource(7)
    tokens = [source.next_token() for _ in range(20_000)]
    pieces = [piece for _, piece in tokens]
    draws = len(OUTPUT_WORDS) + sum(OUTPUT_PUNCTUATION.values())
    for mark, weight in OUTPUT_PUNCTUATION.items():
        assert abs(pieces.count(mark) / len(pieces) - weight / draws) < 0.01, mark
    text = "".join(pieces)
    assert "\n" in text and tokenize(text) == [token_id for token_id, _ in tokens]


def test_natural_length_in_bounds():
    lengths = {natural_length(seed, 16, 64) for seed in range(0, 10_000_000, 99_991)}
    assert min(lengths) >= 16 and max(lengths) <= 64 and len(lengths) > 10
