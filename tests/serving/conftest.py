"""Fixtures of the server tests: a tiny saved GPT-2, apps that are always closed, slowed generators.

    HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=./data python -m pytest tests/serving -q
"""

from __future__ import annotations

from pathlib import Path

import pytest

from python3_distillation.generation import Generator

from .helpers import FAST, Throttle, save_tiny, threaded_servers


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny(tiny_dir) -> Generator:
    return Generator.from_pretrained(tiny_dir, device="cpu")


@pytest.fixture
def make_app():
    """``make_app(config, generators)`` → an app whose batcher threads are stopped after the test."""
    from python3_distillation.serving.app import create_app

    apps = []

    def make(config=None, generators=None):
        app = create_app(config, generators=generators)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["distill"].close()


@pytest.fixture
def client(make_app, tiny):
    return make_app(FAST, {"tiny": tiny}).test_client()


@pytest.fixture
def slow(tiny_dir):
    """A private copy of the tiny model (hooks must not leak into other tests), 20 ms per step."""
    gen = Generator.from_pretrained(tiny_dir, device="cpu")
    throttle = Throttle(gen, delay=0.02)
    yield gen, throttle
    throttle.remove()


@pytest.fixture
def serve_in_thread():
    """``start(app)`` → base URL of a real threaded HTTP server on a free port; all shut down after."""
    with threaded_servers() as start:
        yield start
