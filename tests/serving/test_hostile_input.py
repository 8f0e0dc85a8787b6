"""Hostile input, each request sent together with a good one: never a 5xx, always a JSON error object,
and the good request's text is the same as when it runs alone.

    HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=./data python -m pytest tests/serving/test_hostile_input.py -q

The listed cases are those found by hand (a lone surrogate, top_k ≥ 2**63, huge stop strings,
400-digit integers, deep nesting, temperature 1e-50...); the property test throws random JSON at
both routes.
"""

from __future__ import annotations

import json
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .helpers import sse_events

ROUTES = {"/v1/completions": "max_tokens", "/api/generate": "max_new_tokens"}
GOOD = "It is a truth universally acknowledged"
BIG = "9" * 400


@pytest.fixture(scope="module")
def app(tiny):
    from python3_distillation.serving.app import create_app

    # A 30 ms window: the two requests of a case arrive within it and would share one prefill.
    app = create_app({"batch_window_ms": 30, "batch_max_wait_ms": 60}, generators={"tiny": tiny})
    yield app
    app.extensions["distill"].close()


def good_body(route: str) -> dict:
    return {"prompt": GOOD, ROUTES[route]: 6, "temperature": 0}


def text_of(route: str, resp) -> str:
    body = resp.get_json()
    return body["choices"][0]["text"] if route == "/v1/completions" else body["completions"][0]["text"]


@pytest.fixture(scope="module")
def alone(app) -> dict[str, str]:
    c = app.test_client()
    return {route: text_of(route, c.post(route, json=good_body(route))) for route in ROUTES}


def check_pair(app, alone: dict[str, str], route: str, raw: bytes | str) -> int:
    """Send ``raw`` and the good request at the same time; check both answers. Returns the hostile status."""
    out = {}

    def hostile():
        out["bad"] = app.test_client().post(route, data=raw, content_type="application/json")

    def good():
        out["good"] = app.test_client().post(route, json=good_body(route))

    threads = [threading.Thread(target=hostile), threading.Thread(target=good)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    bad = out["bad"]
    assert bad.status_code < 500, (bad.status_code, bad.get_data(as_text=True)[:300])
    if bad.status_code >= 400:
        assert bad.mimetype == "application/json", bad.get_data(as_text=True)[:300]
        err = bad.get_json()["error"]
        assert isinstance(err["message"], str) and err["message"] and err["type"] and err["code"] == bad.status_code
    elif bad.mimetype == "text/event-stream":
        sse_events(bad.get_data(as_text=True))  # a complete stream, ending in [DONE]
    else:
        assert bad.get_json() is not None
    assert out["good"].status_code == 200, out["good"].get_data(as_text=True)[:300]
    assert text_of(route, out["good"]) == alone[route]
    return bad.status_code


def raw_cases(route: str) -> list[tuple[str, bytes | str, set[int]]]:
    n = ROUTES[route]
    cases = [
        ("lone surrogate in the prompt", '{"prompt": "\\ud800 hi", "%s": 4}' % n, {400, 422}),
        ("lone surrogate in a stop string", '{"prompt": "hi", "stop": ["\\udfff"]}', {400, 422}),
        ("top_k = 2**63", {"prompt": "hi", "top_k": 2**63}, {422}),
        ("top_k = 2**64 + 5", {"prompt": "hi", "top_k": 2**64 + 5}, {422}),
        ("top_k past the vocabulary", {"prompt": "hi", "top_k": 50258}, {422}),
        ("four 250 KB stop strings", {"prompt": "hi", "stop": ["s" * 250_000] * 4}, {422}),
        ("a stop string past the length bound", {"prompt": "hi", "stop": ["s" * 257]}, {422}),
        ("five stop strings", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, {422}),
        ("deep nesting", '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", {400, 422}),
        ("deep nesting in an object", '{"prompt": "hi", "stop": ' + '{"a":' * 5_000 + "1" + "}" * 5_000 + "}",
         {400, 422}),
        ("NaN", '{"prompt": "hi", "temperature": NaN}', {400, 422}),
        ("Infinity", '{"prompt": "hi", "top_p": Infinity}', {400, 422}),
        ("1e400", '{"prompt": "hi", "temperature": 1e400}', {400, 422}),
        ("5000-digit integer", '{"prompt": "hi", "seed": ' + "9" * 5000 + "}", {400, 422}),
        ("prompt past the length bound", {"prompt": "word " * 14_000}, {422}),
        ("prompt past the context", {"prompt": "word " * 100}, {422}),
        ("empty prompt", {"prompt": "   "}, {422}),
        ("prompt of the wrong type", {"prompt": {"text": "hi"}}, {422}),
        ("null body", "null", {422}),
        ("a number for a body", "12", {422}),
        ("not UTF-8", b'{"prompt": "\xff\xfe"}', {400, 422}),
        ("a model name of 10 000 characters", {"prompt": "hi", "model": "m" * 10_000}, {422}),
        ("an unknown model", {"prompt": "hi", "model": "gpt-4"}, {404}),
        ("negative seed", {"prompt": "hi", "seed": -1}, {422}),
        ("seed = 2**64", {"prompt": "hi", "seed": 2**64}, {422}),
        ("repetition penalty 1e-300", {"prompt": "hi", "repetition_penalty": 1e-300}, {422}),
        ("max tokens past the context", {"prompt": "hi", n: 10_000}, {422}),
        ("temperature 1e308", {"prompt": "hi", "temperature": 1e308}, {422}),
        ("boolean for a number", {"prompt": "hi", "temperature": True}, {422}),
    ]
    for field in (n, "temperature", "top_p", "top_k", "seed", "repetition_penalty"):
        cases.append((f"400-digit integer in {field}", '{"prompt": "hi", "%s": %s}' % (field, BIG), {422}))
        cases.append((f"negative 400-digit integer in {field}", '{"prompt": "hi", "%s": -%s}' % (field, BIG), {422}))
    if route == "/v1/completions":
        cases += [("n = 10**400", '{"prompt": "hi", "n": %s}' % BIG, {422}),
                  ("token-id prompt", {"prompt": [[1, 2, 3]]}, {422}),
                  ("stream_options of the wrong type", {"prompt": "hi", "stream_options": [1]}, {422}),
                  ("logit_bias", {"prompt": "hi", "logit_bias": {"50256": -100}}, {422})]
    else:
        cases += [("1000 prompts", {"prompts": ["hi"] * 1000}, {422})]
    return [(name, raw if isinstance(raw, (str, bytes)) else json.dumps(raw), want) for name, raw, want in cases]


@pytest.mark.parametrize("route", ROUTES)
def test_listed_hostile_requests_fail_alone(app, alone, route):
    failures = []
    for name, raw, want in raw_cases(route):
        status = check_pair(app, alone, route, raw)
        if status not in want:
            failures.append((name, status, want))
    assert not failures, failures


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("temperature", [1e-50, 1e-320, 1e-6])
def test_tiny_temperatures_answer_greedy_text(app, alone, route, temperature):
    body = {**good_body(route), "temperature": temperature, "seed": 3}
    resp = app.test_client().post(route, json=body)
    assert resp.status_code == 200 and text_of(route, resp) == alone[route]


json_leaf = (st.none() | st.booleans() | st.integers(min_value=-(10**400), max_value=10**400)
             | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30)
             | st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=3))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
FIELDS = ["prompt", "prompts", "model", "max_tokens", "max_new_tokens", "temperature", "top_p", "top_k", "n", "stop",
          "seed", "stream", "echo", "repetition_penalty", "ignore_eos", "stream_options", "logprobs", "user"]
bodies = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_value, max_size=6),
    st.fixed_dictionaries({"prompt": st.text(max_size=40)},
                          optional={k: json_value for k in FIELDS if k != "prompt"}),
    json_value,
)


@pytest.mark.parametrize("route", ROUTES)
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=bodies)
def test_random_json_never_breaks_a_neighbour(app, alone, route, body):
    check_pair(app, alone, route, json.dumps(body))
