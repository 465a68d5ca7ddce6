"""The official `ollama` Python package against Tidepool's Ollama-compatible API: every call on the
tiny fixture (fast, random weights), and a sensible answer from SmolLM2-135M's real weights."""

import json

import ollama
import pytest


@pytest.fixture(scope="module")
def tiny(tiny_server):
    return ollama.Client(host=tiny_server.base)


GREEDY = {"temperature": 0, "num_predict": 12}


def test_generate_plain_and_streaming_agree(tiny, tiny_server):
    r = tiny.generate(model=tiny_server.model, prompt="Why is the sea salty?", options=GREEDY)
    assert r.done and r.done_reason in ("stop", "length")
    assert isinstance(r.response, str)
    assert 1 <= r.eval_count <= 12 and r.prompt_eval_count > 3
    parts = list(
        tiny.generate(
            model=tiny_server.model, prompt="Why is the sea salty?", options=GREEDY, stream=True
        )
    )
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.response for p in parts) == r.response


def test_chat_plain_and_streaming_agree(tiny, tiny_server):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello!"},
    ]
    r = tiny.chat(model=tiny_server.model, messages=messages, options=GREEDY)
    assert r.message.role == "assistant" and r.done
    parts = list(tiny.chat(model=tiny_server.model, messages=messages, options=GREEDY, stream=True))
    assert parts[-1].done
    assert "".join(p.message.content or "" for p in parts) == r.message.content


def test_chat_format_schema_gives_valid_json(tiny, tiny_server):
    schema = {
        "type": "object",
        "properties": {"mood": {"type": "string", "enum": ["happy", "sad"]}},
        "required": ["mood"],
        "additionalProperties": False,
        # llguidance's option: compact JSON, so random weights cannot pad it with whitespace.
        "x-guidance": {"whitespace_flexible": False},
    }
    r = tiny.chat(
        model=tiny_server.model,
        messages=[{"role": "user", "content": "How do you feel?"}],
        format=schema,
        options={"temperature": 0.8, "seed": 7, "num_predict": 40},
    )
    assert json.loads(r.message.content)["mood"] in ("happy", "sad")


def test_tags_ps_show_version(tiny, tiny_server):
    names = [m.model for m in tiny.list().models]
    assert names == [tiny_server.model]
    running = tiny.ps().models
    assert len(running) >= 1
    assert running[0].model == tiny_server.model and running[0].size > 0
    assert running[0].expires_at is not None
    info = tiny.show(tiny_server.model)
    assert info.details.format == "gguf"
    assert info.modelinfo["general.architecture"] == "qwen2"


def test_errors_are_response_errors(tiny, tiny_server):
    with pytest.raises(ollama.ResponseError) as e:
        tiny.chat(model="llama3:8b", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404 and "llama3:8b" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        tiny.generate(model=tiny_server.model, prompt="x", options={"temperature": 9})
    assert e.value.status_code == 400 and "temperature" in e.value.error


def test_sentiment_profile_by_model_tag(tiny, tiny_server):
    # Random weights, sampled hot: only the profile's grammar keeps every answer a label.
    for seed, text in enumerate(["I love it", "This is awful", "It is Monday", "meh", "!!!"]):
        r = tiny.chat(
            model=f"{tiny_server.model}:sentiment",
            messages=[{"role": "user", "content": text}],
            options={"temperature": 1.3, "seed": seed},
        )
        assert r.message.content in ("positive", "negative", "neutral"), r.message.content


def test_smollm2_knows_paris(smollm2_server):
    client = ollama.Client(host=smollm2_server.base)
    r = client.chat(
        model=smollm2_server.model,
        messages=[
            {"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        options={"temperature": 0, "num_predict": 48},
    )
    assert "paris" in r.message.content.lower(), r.message.content
    streamed = "".join(
        p.response
        for p in client.generate(
            model=smollm2_server.model,
            prompt="What is the capital of France? Answer in one short sentence.",
            options={"temperature": 0, "num_predict": 48},
            stream=True,
        )
    )
    assert "paris" in streamed.lower(), streamed


def test_smollm2_sentiment_and_combined_profiles(smollm2_server):
    client = ollama.Client(host=smollm2_server.base)
    model = f"{smollm2_server.model}:sentiment"
    for text, label in [
        ("I absolutely love this, best day ever!", "positive"),
        ("This is terrible, I hate it. Worst purchase of my life.", "negative"),
        ("The waiter was rude and the soup was cold.", "negative"),
    ]:
        r = client.chat(model=model, messages=[{"role": "user", "content": text}])
        assert r.message.content == label, (text, r.message.content)
    r = client.chat(
        model=f"{smollm2_server.model}:sentiment+chat",
        messages=[{"role": "user", "content": "I absolutely love this beach, best day ever!"}],
        # Greedy: a sampled reply is sometimes a row of emoji, which says
        # nothing about whether the chat profile ran.
        options={"num_predict": 24, "temperature": 0},
    )
    label, reply = r.message.content.split("\n\n", 1)

    assert label == "positive"
    assert len(reply.split()) >= 3, reply
