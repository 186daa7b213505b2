"""The server's API through Starlette's test client: answers, bounds, malformed requests, concurrency."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from starlette.testclient import TestClient

from bdh.explore.explorer import Explorer
from bdh.explore.server import Limits, create_app
from tests.explore.helpers import TEXT, tiny_checkpoint


@pytest.fixture(scope="module")
def explorers(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return [Explorer.load(tiny_checkpoint(root / "a", seed=0)), Explorer.load(tiny_checkpoint(root / "b", seed=1))]


@pytest.fixture(scope="module")
def client(explorers):
    with TestClient(create_app(explorers, Limits(max_chars=200, max_new_tokens=16, max_concurrent=4))) as c:
        yield c


def lines(response) -> list[dict]:
    return [json.loads(line) for line in response.text.splitlines() if line]


def test_the_page_its_assets_and_the_models(client):
    page = client.get("/")
    assert page.status_code == 200 and "/static/explore.js" in page.text
    for asset in ("explore.js", "explore.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    models = client.get("/api/models").json()
    assert [m["n_neurons"] for m in models["models"]] == [512, 512]
    assert models["limits"] == {"max_chars": 200, "max_new_tokens": 16, "max_concurrent": 4}


def test_each_model_answers_for_itself(client, explorers):
    for m, explorer in enumerate(explorers):
        got = client.post("/api/read", json={"model": m, "text": TEXT}).json()
        assert got == json.loads(json.dumps(explorer.read(TEXT)))
    a, b = (client.post("/api/read", json={"model": m, "text": TEXT}).json() for m in (0, 1))
    assert a["ids"] == b["ids"] and a["loss"] != b["loss"]


def test_every_endpoint_answers(client):
    body = {"model": 1, "text": TEXT}
    assert client.post("/api/position", json={**body, "position": 4}).json()["position"] == 4
    neuron = client.post("/api/neuron", json={**body, "layer": 1, "head": 0, "neuron": 7, "site": "x"}).json()
    assert neuron["index"] == 7 and len(neuron["values"]) == len(TEXT)
    syn = client.post("/api/synapses", json={**body, "position": 6, "k": 3}).json()
    assert len(syn["top"]) == 3
    s = syn["top"][0]
    trace = client.post("/api/trace", json={**body, **{k: s[k] for k in ("layer", "head", "i", "j")}}).json()
    assert trace["values"][6] == pytest.approx(s["value"], rel=1e-3)
    gen = client.post("/api/generate", json={**body, "max_new_tokens": 5, "temperature": 0})
    assert gen.status_code == 200 and gen.headers["content-type"].startswith("application/x-ndjson")
    assert [e["index"] for e in lines(gen)] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("path, body, status, words", [
    ("/api/read", {"text": "x" * 201}, 413, "201 characters; the limit is 200"),
    ("/api/generate", {"text": "a", "max_new_tokens": 17}, 422, "'max_new_tokens' must lie in [1, 16]"),
    ("/api/generate", {"text": "a", "temperature": -1}, 422, "'temperature' must lie in"),
    ("/api/generate", {"text": "a", "top_k": 0}, 422, "'top_k' must lie in"),
    ("/api/read", {"text": 5}, 422, "'text' must be a string"),
    ("/api/read", {}, 422, "missing field 'text'"),
    ("/api/read", {"text": ""}, 422, "the text is empty"),
    ("/api/read", {"text": "a", "model": 2}, 404, "no model 2"),
    ("/api/read", {"text": "a", "model": True}, 422, "'model' must be an integer"),
    ("/api/read", {"text": "a", "top": 1000}, 422, "'top' must lie in"),
    ("/api/position", {"text": "abc", "position": 3}, 422, "position 3 is outside the text"),
    ("/api/position", {"text": "abc", "position": "1"}, 422, "'position' must be an integer"),
    ("/api/neuron", {"text": "abc", "layer": 0, "head": 2, "neuron": 0}, 422, "no neuron at layer 0, head 2"),
    ("/api/neuron", {"text": "abc", "layer": 0, "head": 0, "neuron": 0, "site": "z"}, 422, "'site' must be one of"),
    ("/api/trace", {"text": "abc", "layer": 0, "head": 0, "i": 0, "j": 0}, 422, "no synapse 0:0:0:0"),
    ("/api/concepts", {"text": "abc", "concept": "../../etc/passwd"}, 422, "'concept' must be one of"),
])
def test_bad_requests_get_a_4xx_with_a_message(client, path, body, status, words):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]
    assert client.post("/api/read", json={"text": "still serving"}).status_code == 200


def test_malformed_requests_get_a_4xx_and_the_server_keeps_serving(client):
    for raw in (b"not json", b"[1, 2]", b'{"text": "a"', b"\xff\xfe", b""):
        response = client.post("/api/read", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400 and "JSON object" in response.json()["error"]
    big = json.dumps({"text": "a" * 100_000}).encode()
    assert client.post("/api/read", content=big, headers={"content-type": "application/json"}).status_code == 413
    form = client.post("/api/read", content=b'{"text": "a"}', headers={"content-type": "text/plain"})
    assert form.status_code == 415 and "Content-Type: application/json" in form.json()["error"]
    assert client.get("/api/read").status_code == 405
    assert client.get("/api/nothing").status_code == 404
    assert client.get("/static/../server.py").status_code == 404
    assert client.post("/api/read", json={"text": TEXT}).status_code == 200


def test_concurrent_requests_give_the_answers_of_one_at_a_time(client):
    asks = [("/api/read", {"model": 0, "text": TEXT}), ("/api/read", {"model": 0, "text": TEXT[::-1]}),
            ("/api/position", {"model": 0, "text": TEXT, "position": 11}),
            ("/api/neuron", {"model": 0, "text": TEXT, "layer": 1, "head": 1, "neuron": 3}),
            ("/api/synapses", {"model": 0, "text": TEXT, "position": 30}),
            ("/api/generate", {"model": 0, "text": TEXT, "max_new_tokens": 8, "temperature": 1.0, "seed": 5}),
            ("/api/generate", {"model": 1, "text": TEXT, "max_new_tokens": 8, "temperature": 1.0, "seed": 5})]

    def ask(item):
        path, body = item
        response = client.post(path, json=body)
        assert response.status_code == 200, response.text
        return response.text

    alone = [ask(item) for item in asks]
    for _ in range(2):
        with ThreadPoolExecutor(len(asks)) as pool:  # two at once, pair by pair
            for k in range(0, len(asks), 2):
                assert list(pool.map(ask, asks[k:k + 2])) == alone[k:k + 2]


def test_more_requests_than_the_limit_are_refused_until_one_finishes(explorers):
    with TestClient(create_app(explorers, Limits(max_concurrent=1, max_new_tokens=50))) as client:
        with client.stream("POST", "/api/generate", json={"text": "a", "max_new_tokens": 50}) as held:
            assert json.loads(next(held.iter_lines()))["index"] == 0  # one generation in flight
            busy = client.post("/api/read", json={"text": "b"})
            assert busy.status_code == 429 and "at most 1 requests at a time" in busy.json()["error"]
        for _ in range(100):  # the server sees the client leave, stops generating and gives the slot back
            answer = client.post("/api/read", json={"text": "b"})
            if answer.status_code != 429:
                break
            time.sleep(0.05)
        assert answer.status_code == 200


def test_limits_must_be_positive():
    from bdh import UserError

    with pytest.raises(UserError, match="max-chars must be at least 1"):
        Limits(max_chars=0)


def test_a_local_server_refuses_requests_addressed_to_another_host(explorers):
    app = create_app(explorers, local_only=True)
    for base in ("http://127.0.0.1:8765", "http://localhost:8765", "http://[::1]:8765"):
        with TestClient(app, base_url=base) as client:
            assert client.post("/api/read", json={"text": "a"}).status_code == 200
    with TestClient(app, base_url="http://attacker.example:8765") as client:
        refused = client.get("/")
        assert refused.status_code == 400 and "not attacker.example:8765" in refused.json()["error"]
