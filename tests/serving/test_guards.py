"""Safe by default: JSON-only POST bodies (415) and the Host allow-list against DNS rebinding (421).

    HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=./data python -m pytest tests/serving/test_guards.py -q
"""

from __future__ import annotations

import pytest

from python3_distillation.serving.app import host_name

from .helpers import FAST, assert_error

BODY = '{"prompt": "hi", "max_tokens": 1}'


@pytest.mark.parametrize("route", ["/v1/completions", "/api/generate"])
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx"])
def test_post_needs_json(client, route, content_type):
    """What a page can send cross-site without a preflight (text/plain, forms) is refused."""
    headers = {"Content-Type": content_type} if content_type else {}
    err = assert_error(client.post(route, data=BODY, headers=headers), 415, "unsupported_media_type")
    assert "application/json" in err["message"]


def test_json_with_a_charset_is_fine(client):
    resp = client.post("/v1/completions", data=BODY, headers={"Content-Type": "application/json; charset=utf-8"})
    assert resp.status_code == 200


@pytest.mark.parametrize("host", ["localhost", "localhost:6006", "127.0.0.1:6006", "[::1]:6006", "127.0.0.2",
                                  "LOCALHOST:6006"])
def test_loopback_hosts_are_allowed(client, host):
    assert client.get("/health", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:6006", "localhost.evil.example",
                                  "192.168.1.7:6006", "10.0.0.1"])
def test_other_hosts_are_misdirected(client, host):
    for resp in (client.get("/", headers={"Host": host}),
                 client.post("/v1/completions", data=BODY, headers={"Host": host, "Content-Type": "application/json"})):
        assert_error(resp, 421, "misdirected_request", contains="DISTILL_ALLOWED_HOSTS")


def test_bind_address_and_configured_hosts_are_allowed(make_app, tiny):
    c = make_app({**FAST, "host": "10.1.2.3", "allowed_hosts": ["box.local"]}, {"tiny": tiny}).test_client()
    for host in ("10.1.2.3:6006", "box.local:6006", "localhost"):
        assert c.get("/health", headers={"Host": host}).status_code == 200, host
    assert c.get("/health", headers={"Host": "10.1.2.4"}).status_code == 421


def test_a_wildcard_bind_allows_ip_addresses_and_service_names_not_domains(make_app, tiny):
    """Docker binds 0.0.0.0: clients reach it by the host's address, which rebinding cannot forge."""
    c = make_app({**FAST, "host": "0.0.0.0"}, {"tiny": tiny}).test_client()
    for host in ("192.168.1.7:6006", "[2001:db8::1]:6006", "localhost", "backend:6006", "gpt2-distill"):
        assert c.get("/health", headers={"Host": host}).status_code == 200, host
    # A name with a dot could be an attacker's domain pointed at this address.
    for host in ("evil.example", "backend.default.svc.cluster.local:6006", "evil.example.", ":6006"):
        assert c.get("/health", headers={"Host": host}).status_code == 421, host
    # On a loopback bind a single-label name is not enough.
    local = make_app({**FAST, "host": "127.0.0.1"}, {"tiny": tiny}).test_client()
    assert local.get("/health", headers={"Host": "backend:6006"}).status_code == 421


def test_star_allows_every_host(make_app, tiny):
    c = make_app({**FAST, "allowed_hosts": ["*"]}, {"tiny": tiny}).test_client()
    assert c.get("/health", headers={"Host": "anything.example"}).status_code == 200


def test_host_name_parsing():
    assert host_name("LocalHost:6006") == "localhost"
    assert host_name("[::1]:6006") == "::1"
    assert host_name("::1") == "::1"
    assert host_name("example.com.") == "example.com"


def test_gunicorn_tells_the_app_its_bind_address(monkeypatch):
    """The production config passes --bind on to the app (DISTILL_HOST), so a wildcard bind allows IPs."""
    from types import SimpleNamespace

    from python3_distillation.serving import gunicorn_conf
    from python3_distillation.serving.settings import ServeConfig

    monkeypatch.setenv("DISTILL_HOST", "")  # recorded, so what the hook sets is undone after the test
    monkeypatch.delenv("DISTILL_HOST")
    gunicorn_conf.on_starting(SimpleNamespace(cfg=SimpleNamespace(bind=["0.0.0.0:6006"])))
    cfg = ServeConfig.from_env()
    assert cfg.host == "0.0.0.0"
    assert gunicorn_conf.threads == ServeConfig().server_threads and gunicorn_conf.worker_class == "gthread"
