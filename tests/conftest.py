"""Fixtures: tiny random models and tokenizers built in-process (nothing is downloaded),
artifacts built by the real `compress` code, and a real uvicorn server on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.helpers import (  # noqa: E402  (after HF_HUB_OFFLINE)
    build_artifact, torch_threads, make_mm_tokenizer, save_tiny_gemma3, save_tiny_llama, save_tiny_memory_model)
from tests.live_server import LiveServer  # noqa: E402


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama")


@pytest.fixture(scope="session")
def gemma_dir(tmp_path_factory) -> Path:
    return save_tiny_gemma3(tmp_path_factory.mktemp("gemma") / "tiny-gemma")


@pytest.fixture(scope="session")
def llama_artifact(llama_dir, tmp_path_factory) -> Path:
    return build_artifact(llama_dir, tmp_path_factory.mktemp("art") / "tiny-chat")


@pytest.fixture(scope="session")
def gemma_artifact(gemma_dir, tmp_path_factory) -> Path:
    return build_artifact(gemma_dir, tmp_path_factory.mktemp("art") / "tiny-base")


@pytest.fixture(scope="session")
def live(llama_artifact, gemma_artifact):
    from server.config import ServerConfig

    srv = LiveServer(ServerConfig(artifacts=[f"tiny-chat={llama_artifact}", f"tiny-base={gemma_artifact}"],
                                  max_model_len=128, max_queue=4)).wait()
    yield srv
    srv.close()


@pytest.fixture
def client(live):
    return live.client()


@pytest.fixture(scope="session")
def mm_tokenizer(tmp_path_factory) -> Path:
    return make_mm_tokenizer(tmp_path_factory.mktemp("mmtok") / "tokenizer.model")


@pytest.fixture(scope="session")
def mm_checkpoint(mm_tokenizer, tmp_path_factory) -> Path:
    return save_tiny_memory_model(tmp_path_factory.mktemp("mm") / "mm-tiny", mm_tokenizer)



@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's
    waiting threads make training and calibration loops ~10x slower."""
    with torch_threads(1):
        yield
