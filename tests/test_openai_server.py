"""The OpenAI-compatible LIP (examples/openai_server.py), driven by the real `openai`
client and by curl, on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import jsonschema
import openai
import pytest

from symphony.lipctl import connect
from tests.openai_helpers import HELLO, free_port, start_lip, stop_lip
from tests.tiny import SPECIALS


def test_models_and_a_chat_completion(client, model) -> None:
    assert [m.id for m in client.models.list().data] == [model]
    assert client.models.retrieve(model).id == model
    r = client.chat.completions.create(model=model, messages=HELLO, max_tokens=8, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_gives_the_same_text_and_usage_last(client, model) -> None:
    whole = client.chat.completions.create(
        model=model, messages=HELLO, max_tokens=12, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=HELLO,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert "\ufffd" not in text or "\ufffd" in whole.choices[0].message.content
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in body)
    assert body[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_n_choices_share_one_prefill_and_a_seed_repeats_them(served, client, model) -> None:
    thread, _ = served
    args = {"model": model, "messages": HELLO, "max_tokens": 10, "n": 3, "seed": 7}
    first = client.chat.completions.create(**args)
    again = client.chat.completions.create(**args)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1  # each choice draws from its own stream
    # the second request found the prompt in the prefix cache
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    with connect(thread.server.config.socket_path) as lip:
        assert lip.listdir("openai-0") == []  # every request's files are gone


def test_n_choices_generate_on_forks_that_share_the_prompts_pages(served, client, model) -> None:
    thread, _ = served
    long_prompt = [{"role": "user", "content": "Tell me about rivers and the sea. " * 6}]
    stream = client.chat.completions.create(
        model=model,
        messages=long_prompt,
        max_tokens=400,
        n=3,
        seed=1,
        stream=True,
        logit_bias={str(256 + SPECIALS.index("<|im_end|>")): -100},  # still going when we look
    )
    next(c for c in stream if c.choices and c.choices[0].delta.content)
    with connect(thread.server.config.socket_path) as lip:
        stats = [lip.kv(f"openai-0/{name}").stat() for name in lip.listdir("openai-0")]
    stream.close()
    assert len(stats) == 3  # the prefilled file and its two forks, one per choice
    prompt_pages = min(s["tokens"] for s in stats) // 4 - 1  # page_size 4
    assert prompt_pages > 10
    assert all(s["shared_pages"] >= prompt_pages for s in stats)


def test_logprobs_with_five_alternatives(client, model) -> None:
    r = client.chat.completions.create(
        model=model, messages=HELLO, max_tokens=6, temperature=0, logprobs=True, top_logprobs=5
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0.0 and len(entry.top_logprobs) == 5
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6  # greedy: the best


def test_a_stream_carries_each_tokens_logprobs(client, model) -> None:
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=HELLO,
            max_tokens=8,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    entries = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    made = chunks[-1].usage.completion_tokens  # an end token has no text, so no entry
    assert made - 1 <= len(entries) <= made
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)


def test_json_schema_responses_validate(client, model) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
        "required": ["city", "n"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    for seed in range(20):
        r = client.chat.completions.create(
            model=model, messages=HELLO, max_tokens=80, seed=seed, response_format=fmt
        )
        if r.choices[0].finish_reason == "stop":
            jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        else:  # a random model may write a long number; what it wrote is JSON's beginning
            assert r.choices[0].message.content.startswith('{"city": "')


def test_text_completions_with_echo_and_logprobs(client, model) -> None:
    r = client.completions.create(
        model=model, prompt="The river", max_tokens=5, temperature=0, echo=True, logprobs=2
    )
    choice = r.choices[0]
    assert choice.text.startswith("The river")
    # echo: the prompt's tokens, then the completion's
    assert len(choice.logprobs.tokens) == r.usage.prompt_tokens + r.usage.completion_tokens
    assert all(top is None or len(top) <= 2 for top in choice.logprobs.top_logprobs)
    ids = client.completions.create(model=model, prompt=[84, 104, 101], max_tokens=3)
    assert ids.usage.prompt_tokens == 3


def test_errors_are_openai_error_objects(client, model) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=HELLO, max_tokens="many")  # type: ignore[arg-type]
    assert "max_tokens" in str(info.value)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(model=model, messages=HELLO, max_tokens=8000)
    assert "maximum context length" in str(long.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[])


def test_an_api_key_is_required_when_set(served, tmp_path) -> None:
    thread, _ = served
    log = tmp_path / "keyed.log"
    lip, url = start_lip(thread.server.config.socket_path, log, "--api-key", "sesame")
    try:
        bad = openai.OpenAI(base_url=url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=url, api_key="sesame", max_retries=0)
        assert good.models.list().data
    finally:
        stop_lip(lip, log)


def test_thirty_two_concurrent_requests(client, model) -> None:
    results: list[str] = []

    def one(i: int) -> None:
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"Count to {i}."}],
            max_tokens=6,
            temperature=0,
        )
        results.append(r.choices[0].finish_reason)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 32


def test_a_client_that_goes_away_mid_stream_stops_its_work(served, client, model) -> None:
    thread, _ = served
    stream = client.chat.completions.create(
        model=model, messages=HELLO, max_tokens=1500, temperature=1.0, stream=True
    )
    for _, _chunk in zip(range(5), stream, strict=False):
        pass
    stream.close()  # the connection goes
    scheduler = thread.server.scheduler
    deadline = time.monotonic() + 10
    while True:
        before = scheduler.num_tokens
        time.sleep(0.5)
        if scheduler.num_tokens == before:
            break
        assert time.monotonic() < deadline, "the generation went on"
    with connect(thread.server.config.socket_path) as lip:
        assert lip.listdir("openai-0") == []


def test_curl_reads_the_event_stream(served, model) -> None:
    _, url = served
    body = json.dumps(
        {"model": model, "messages": HELLO, "max_tokens": 5, "temperature": 0, "stream": True}
    )
    out = subprocess.run(
        [
            "curl",
            "-sN",
            f"{url}/chat/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    events = [line for line in out.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0].removeprefix("data: "))["object"] == "chat.completion.chunk"


def test_lipctl_serve_openai_starts_it_with_the_server(tmp_path) -> None:
    from tests.server_helpers import start_server_process, stop_server_process

    port = free_port()
    socket_path = str(tmp_path / "s.sock")
    env = {**os.environ, "SYMPHONY_API_KEY": "sesame"}
    server = start_server_process(
        socket_path, "--pages", "256", "--openai", f"127.0.0.1:{port}", env=env
    )
    try:
        url = f"http://127.0.0.1:{port}/v1"
        api = openai.OpenAI(base_url=url, api_key="sesame", max_retries=0)
        deadline = time.monotonic() + 60
        while True:  # the LIP starts once the server is up
            try:
                model = api.models.list().data[0].id
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "the OpenAI LIP did not start"
                time.sleep(0.2)
        r = api.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=12,
            temperature=0,
        )
        assert "Paris" in r.choices[0].message.content
        stranger = openai.OpenAI(base_url=url, api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):  # the server's key binds its LIP
            stranger.models.list()
        with connect(socket_path) as lip:  # it is a LIP like any other
            (row,) = [p for p in lip.ps() if p["name"] == "openai_server.py"]
        # bound like any uid's LIPs, though the server's user may be root: 128 of 256 pages
        assert row["limits"]["pages"] == 128
        assert row["limits"]["cpu_seconds"] == 24 * 3600  # not killed after an hour
    finally:
        err = stop_server_process(server)
    assert "Traceback" not in err, err


def test_nulls_for_defaults_and_odd_values_are_served(client, model) -> None:
    r = client.chat.completions.with_raw_response.create(
        model=model,
        messages=HELLO,
        max_tokens=3,
        extra_body={"temperature": None, "top_p": 0, "n": None, "stream": None, "seed": -5},
    ).parse()
    assert len(r.choices) == 1


def test_bad_inputs_are_400_never_500(client, model) -> None:
    bad = [
        ("completions", {"prompt": [2**70], "max_tokens": 2}),
        ("completions", {"prompt": [100000], "max_tokens": 2}),
        ("chat", {"messages": HELLO, "tool_choice": "required"}),
        (
            "chat",
            {
                "messages": HELLO,
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": "f"},
            },
        ),
        ("chat", {"messages": [*HELLO, {"role": "assistant", "tool_calls": [{"function": None}]}]}),
    ]
    for kind, body in bad:
        create = (
            client.completions.create if kind == "completions" else client.chat.completions.create
        )
        with pytest.raises(openai.BadRequestError):
            create(model=model, **body)


def test_streamed_text_completions_of_three_choices(client, model) -> None:
    args = {"model": model, "prompt": "The river", "max_tokens": 6, "n": 3, "seed": 11}
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True))
    texts = {i: "" for i in range(3)}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.text
    # a choice may be empty (an end token first, or bytes of a character not yet whole)
    assert list(texts.values()) == [c.text for c in whole.choices]
    ends = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(ends) == 3


def test_logit_bias_steers_the_tokens(client, model) -> None:
    r = client.chat.completions.create(
        model=model, messages=HELLO, max_tokens=5, temperature=0, logit_bias={"120": 100}
    )
    assert r.choices[0].message.content == "xxxxx"  # the tiny tokenizer: 120 is "x"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=HELLO, logit_bias={"x": 1})


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(client, model) -> None:
    prompt = "The river bends"
    scored = client.completions.create(
        model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == prompt
    assert "".join(lp.tokens) == prompt  # the tiny tokenizer: a token a byte
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset[-1] == len(prompt) - 1
    assert scored.usage.completion_tokens == 0
    more = client.completions.create(
        model=model, prompt=prompt, max_tokens=3, echo=True, logprobs=1, temperature=0
    )
    tail = more.choices[0].logprobs
    assert len(tail.tokens) == len(prompt) + 3
    assert tail.token_logprobs[1 : len(prompt)] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)
