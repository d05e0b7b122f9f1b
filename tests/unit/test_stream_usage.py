"""Streams are asked for their usage, which is stripped again where the client did not ask for it."""

from __future__ import annotations


def test_usage_is_asked_for_and_stripped_as_vllm_would_not_have_sent_it() -> None:
    from consumer.backend_body import ask_for_usage
    from consumer.token_counts import StreamUsage

    payload: dict[str, object] = {"stream": True, "stream_options": {"continuous_usage_stats": True}}
    assert ask_for_usage(payload)
    assert payload["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}
    assert not ask_for_usage({"stream": True, "stream_options": {"include_usage": True}})

    # vLLM's chat stream with include_usage: every chunk says "usage":null, a last chunk has the counts.
    head = b'data: {"id":"c","object":"chat.completion.chunk","choices":'
    chunk = head + b'[{"index":0,"delta":{"content":"%s"}}],"usage":null}\n\n'
    usage = head + b'[],"usage":{"prompt_tokens":7,"completion_tokens":2}}\n\n'
    sent = chunk % b"a" + chunk % b"b" + usage + b"data: [DONE]\n\n"
    expected = (chunk % b"a" + chunk % b"b").replace(b',"usage":null', b"") + b"data: [DONE]\n\n"
    for size in (1, 7, 50, len(sent)):
        watcher = StreamUsage(strip=True)
        out = b"".join(watcher.feed(sent[i : i + size]) for i in range(0, len(sent), size)) + watcher.end()
        assert out == expected and watcher.counts == (7, 2)
    by_event = StreamUsage(strip=True)  # one whole event per read: token events take the fast path
    reads = [chunk % b"a", chunk % b"b", usage, b"data: [DONE]\n\n"]
    assert b"".join(by_event.feed(read) for read in reads) + by_event.end() == expected
    assert by_event.counts == (7, 2)
    kept = StreamUsage(strip=False)  # the client asked: untouched, still counted
    assert kept.feed(sent) == sent and kept.end() == b"" and kept.counts == (7, 2)

    # Completion chunks carry "usage":null with or without include_usage: it stays.
    text = b'data: {"id":"t","object":"text_completion","choices":[{"text":"a"}],"usage":null}\n\n'
    watcher = StreamUsage(strip=True)
    assert watcher.feed(text + b"data: [DONE]\n\n") == text + b"data: [DONE]\n\n"


def test_stripped_usage_leaves_the_system_fingerprint_where_vllm_puts_it_without_usage() -> None:
    from consumer.token_counts import StreamUsage

    # vLLM 0.32: with include_usage the fingerprint is on the usage chunk, without it on the last chunk.
    head = b'data: {"id":"t","object":"text_completion","choices":'
    token = head + b'[{"index":0,"text":"a","finish_reason":null}]}\n\n'
    last = head + b'[{"index":0,"text":"b","finish_reason":"length"}]}\n\n'
    usage = head + b'[],"usage":{"prompt_tokens":3,"completion_tokens":2},"system_fingerprint":"vllm-x"}\n\n'
    sent = token + last + usage + b"data: [DONE]\n\n"
    without = token + last[:-3] + b',"system_fingerprint":"vllm-x"}\n\n' + b"data: [DONE]\n\n"
    for size in (1, 9, len(sent)):
        watcher = StreamUsage(strip=True)
        out = b"".join(watcher.feed(sent[i : i + size]) for i in range(0, len(sent), size)) + watcher.end()
        assert out == without and watcher.counts == (3, 2)
    cut_short = StreamUsage(strip=True)  # a stream that ends before its usage chunk loses nothing
    assert cut_short.feed(token + last) + cut_short.end() == token + last


def test_a_stream_cut_short_is_charged_the_tokens_it_carried() -> None:
    from consumer.token_counts import StreamUsage

    # A chat stream: the role chunk carries no token; each content chunk carries one.
    head = b'data: {"id":"c","object":"chat.completion.chunk","choices":'
    role = head + b'[{"index":0,"delta":{"role":"assistant","content":""}}],"usage":null}\n\n'
    chunk = head + b'[{"index":0,"delta":{"content":"x"}}],"usage":null}\n\n'
    usage = head + b'[],"usage":{"prompt_tokens":7,"completion_tokens":4}}\n\n'
    cut = role + chunk * 3 + chunk[:20]  # the backend stopped in the middle of an event
    for strip in (True, False):
        watcher = StreamUsage(strip=strip)
        for i in range(0, len(cut), 11):
            watcher.feed(cut[i : i + 11])
        assert watcher.so_far() == (None, 3)  # the prompt's tokens are not known
        watcher.feed(chunk[20:] + usage + b"data: [DONE]\n\n")
        watcher.end()
        assert watcher.so_far() == (7, 4)  # once the backend's usage came, it is what counts


def test_the_prompt_of_a_cut_answer_is_asked_of_tokenize_with_the_fields_that_make_it() -> None:
    import orjson

    from consumer.token_counts import count_of, tokenize_body

    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    asked = tokenize_body("/v1/chat/completions", orjson.dumps({**chat, "tools": []}))
    assert asked is not None and orjson.loads(asked) == {
        "model": "m",
        "messages": chat["messages"],
        "tools": [],
    }
    plain = tokenize_body("/v1/completions", b'{"model": "m", "prompt": "hi", "n": 2}')
    assert plain is not None and orjson.loads(plain) == {"model": "m", "prompt": "hi"}
    assert tokenize_body("/v1/completions", b'{"model": "m", "prompt": ["a", "b"]}') is None
    assert tokenize_body("/v1/embeddings", b'{"model": "m", "input": "a"}') is None
    assert tokenize_body("/v1/completions", b"not json") is None
    assert count_of(b'{"count": 7, "tokens": []}') == 7 and count_of(b'{"count": true}') is None
