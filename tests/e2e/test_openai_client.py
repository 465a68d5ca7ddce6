"""The official `openai` Python package against Tidepool serving real weights (SmolLM2-135M)."""

import openai
import pytest


@pytest.fixture(scope="module")
def client(smollm2_server):
    return openai.OpenAI(base_url=smollm2_server.base + "/v1", api_key="unused")


QUESTION = [
    {"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
]


def test_models_lists_the_served_model(client, smollm2_server):
    ids = [m.id for m in client.models.list().data]
    assert ids == [smollm2_server.model]
    assert smollm2_server.model == "smollm2-135m-instruct"


def test_chat_completion_knows_paris(client, smollm2_server):
    r = client.chat.completions.create(
        model=smollm2_server.model, messages=QUESTION, max_tokens=48, temperature=0
    )
    text = r.choices[0].message.content
    assert "paris" in text.lower(), text
    assert r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 10
    assert 1 <= u.completion_tokens <= 48
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_streaming_chat_completion_knows_paris(client, smollm2_server):
    stream = client.chat.completions.create(
        model=smollm2_server.model,
        messages=QUESTION,
        max_tokens=48,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "paris" in text.lower(), text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [finishes[-1]] and finishes[-1] in ("stop", "length")
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens >= 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_and_plain_answers_agree(client, smollm2_server):
    plain = client.chat.completions.create(
        model=smollm2_server.model, messages=QUESTION, max_tokens=24, temperature=0
    ).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=smollm2_server.model, messages=QUESTION, max_tokens=24, temperature=0, stream=True
        )
        if c.choices
    )
    assert plain == streamed


def test_errors_surface_as_openai_exceptions(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, temperature=9)
    assert "temperature" in str(e.value)
