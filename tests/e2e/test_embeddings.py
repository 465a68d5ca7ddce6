"""Embeddings through the official clients: `openai`'s `embeddings.create` (which asks for base64
by default) and `ollama`'s `embed` and `embeddings`, against `tidepool serve` on SmolLM2-135M's
real weights and the llama.cpp engine (the one that embeds)."""

import math

import numpy as np
import ollama
import openai
import pytest

from conftest import ENGINE_CONFIG, Server

# SmolLM2-135M's hidden size.
WIDTH = 576


@pytest.fixture(scope="module")
def server():
    s = Server(
        ["--model", "smollm2-135m-instruct", "--engine", "llamacpp", "--config", ENGINE_CONFIG]
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused")


@pytest.fixture(scope="module")
def oll(server):
    return ollama.Client(host=server.base)


def cos(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_openai_batch_in_order_unit_length_and_repeatable(oai, server):
    texts = ["The cat sat on the mat.", "Interest rates rose again.", "The cat sat on the mat."]
    r = oai.embeddings.create(model=server.model, input=texts)
    assert r.object == "list" and r.model == server.model
    assert [d.index for d in r.data] == [0, 1, 2]
    vectors = [d.embedding for d in r.data]
    assert all(len(v) == WIDTH for v in vectors)
    assert all(math.isclose(np.linalg.norm(v), 1.0, rel_tol=1e-4) for v in vectors)
    assert vectors[0] == vectors[2], "identical inputs give identical vectors"
    assert r.usage.prompt_tokens > 6 and r.usage.total_tokens == r.usage.prompt_tokens
    # Alone, each input gets the vector it got in the batch.
    for text, v in zip(texts[:2], vectors):
        alone = oai.embeddings.create(model=server.model, input=text, encoding_format="float")
        assert cos(alone.data[0].embedding, v) > 0.9999


def test_a_sentence_is_closer_to_its_paraphrase_than_to_an_unrelated_one(oai, server):
    r = oai.embeddings.create(
        model=server.model,
        input=[
            "The cat is sleeping on the sofa.",
            "A cat naps on the couch.",
            "Quarterly revenue grew by twelve percent.",
        ],
    )
    s, p, u = (d.embedding for d in r.data)
    assert cos(s, p) > cos(s, u), (cos(s, p), cos(s, u))


def test_openai_token_ids_dimensions_and_bad_input(oai, server):
    r = oai.embeddings.create(model=server.model, input=[[1, 2, 3], [4, 5]])
    assert len(r.data) == 2 and r.usage.prompt_tokens == 5
    ok = oai.embeddings.create(model=server.model, input="hello", dimensions=WIDTH)
    assert len(ok.data[0].embedding) == WIDTH
    with pytest.raises(openai.BadRequestError, match="cannot be shortened"):
        oai.embeddings.create(model=server.model, input="hello", dimensions=64)
    with pytest.raises(openai.BadRequestError, match="must not be empty"):
        oai.embeddings.create(model=server.model, input="")
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        oai.embeddings.create(model=server.model, input=[[10**9]])
    with pytest.raises(openai.NotFoundError):
        oai.embeddings.create(model="no-such-model", input="hello")


def test_ollama_embed_matches_openai_and_the_older_endpoint_is_unnormalized(oll, oai, server):
    texts = ["The cat sat on the mat.", "Interest rates rose again."]
    r = oll.embed(model=server.model, input=texts)
    assert r.model == server.model and len(r.embeddings) == 2
    assert all(len(v) == WIDTH for v in r.embeddings)
    assert all(math.isclose(np.linalg.norm(v), 1.0, rel_tol=1e-4) for v in r.embeddings)
    assert r.prompt_eval_count > 6 and r.total_duration > 0
    o = oai.embeddings.create(model=server.model, input=texts, encoding_format="float")
    for a, b in zip(r.embeddings, (d.embedding for d in o.data)):
        assert cos(a, b) > 0.9999

    old = oll.embeddings(model=server.model, prompt=texts[0])
    assert len(old.embedding) == WIDTH
    assert not math.isclose(np.linalg.norm(old.embedding), 1.0, rel_tol=1e-3)
    assert cos(old.embedding, r.embeddings[0]) > 0.9999

    assert oll.embed(model=server.model, input="").embeddings == []
    with pytest.raises(ollama.ResponseError) as e:
        oll.embed(model=server.model, input="word " * 5000, truncate=False)
    assert e.value.status_code == 400 and "context holds" in e.value.error
    long = oll.embed(model=server.model, input="word " * 5000)
    assert len(long.embeddings) == 1, "truncated by default"
