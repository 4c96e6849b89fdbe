"""Streaming a generation: pieces are whole characters with the tokens that made them."""

from __future__ import annotations

import trio

from symphony.engine.tokenizer import StreamDecoder, Tokenizer
from symphony.sched.generation import GenerateState
from tests.tiny import CHATML, tiny_tokenizer_json


def streamed(text: str, stop: tuple[str, ...] = (), max_tokens: int = 100):  # type: ignore[no-untyped-def]
    """Push `text`'s tokens through a GenerateState; the pieces it streamed and itself."""
    tok = Tokenizer(tiny_tokenizer_json(), CHATML, bos_token_id=257, eos_token_id=258)
    send, receive = trio.open_memory_channel[dict](1000)
    state = GenerateState(max_tokens, frozenset({258}), stop, StreamDecoder(tok), send)
    for token in tok.encode(text):
        state.push(token)
        state.stream_piece()
        if state.finish_reason:
            break
    pieces = []
    while True:
        try:
            pieces.append(receive.receive_nowait())
        except trio.WouldBlock:
            break
    return pieces, state


def test_an_emoji_split_across_tokens_streams_whole():
    pieces, state = streamed("a🙂b é")
    assert all("\ufffd" not in p["text"] for p in pieces)
    assert [p["text"] for p in pieces] == ["a", "🙂", "b", " ", "é"]
    assert [len(p["token_ids"]) for p in pieces] == [1, 4, 1, 1, 2]
    assert [t for p in pieces for t in p["token_ids"]] == state.token_ids
    assert "".join(p["text"] for p in pieces) == state.text == "a🙂b é"


def test_what_could_become_a_stop_string_is_held_back():
    pieces, state = streamed("one two STOP three", stop=("STOP",))
    assert state.finish_reason == "stop" and state.text == "one two "
    assert "".join(p["text"] for p in pieces) == "one two "
    assert all("S" not in p["text"] for p in pieces)
    assert [t for p in pieces for t in p["token_ids"]] == state.token_ids


def test_the_last_piece_carries_the_last_tokens_even_without_text():
    pieces, state = streamed("hi🙂", max_tokens=4)  # ends inside the emoji
    assert state.finish_reason == "length"
    assert [t for p in pieces for t in p["token_ids"]] == state.token_ids
    assert "".join(p["text"] for p in pieces) == state.text == "hi"


def test_the_work_per_token_does_not_grow_with_the_text():
    """What a token's stop-string search reads (the held-back tail) stays bounded
    however long the text: the text is joined once, at the end."""
    tok = Tokenizer(tiny_tokenizer_json(), CHATML, bos_token_id=257, eos_token_id=258)
    state = GenerateState(10_000, frozenset(), ("END!",), StreamDecoder(tok), None)
    longest_pending = 0
    for token in tok.encode("lorem ipsum dolor sit amet " * 200 + "the END!"):
        state.push(token)
        longest_pending = max(longest_pending, len(state.pending))
        state.stream_piece()
        if state.finish_reason:
            break
    assert state.finish_reason == "stop"
    assert state.text == "lorem ipsum dolor sit amet " * 200 + "the "
    assert longest_pending <= len("END!")
