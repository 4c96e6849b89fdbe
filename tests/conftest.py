"""Shared fixtures: a tiny random-weight engine, the real model loaded once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# before anything imports triton: triton.language's own functions are decorated for the
# interpreter, or not, when it is first imported
import tests.triton_device  # noqa: F401
from symphony.engine.config import EngineConfig
from symphony.engine.engine import Engine
from tests.mount_helpers import mounted_server
from tests.tiny import tiny_model_files


def make_tiny_engine(num_pages: int = 64, page_size: int = 4, **config: object) -> Engine:
    engine_config = EngineConfig(device="cpu", num_pages=num_pages, page_size=page_size, **config)  # type: ignore[arg-type]
    return Engine(tiny_model_files(), engine_config)


@pytest.fixture
def tiny_engine() -> Engine:
    return make_tiny_engine()


@pytest.fixture(scope="session")
def real_engine() -> Engine:
    """The embedded SmolLM2-135M in fp32, loaded once per session (from the weight cache)."""
    return Engine(None, EngineConfig(device="cpu", num_pages=1024, quant="fp32"))


@pytest.fixture(scope="session")
def hf_reference():
    """transformers loading the same GGUF file offline: the independent reference."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import torch

    from symphony.engine.default_model import default_model_path

    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


@pytest.fixture
def tiny_server(tmp_path):
    """A tiny-model syscall server in a thread (tests/server_helpers.py), 128 pages of 4."""
    from tests.server_helpers import ServerThread

    thread = ServerThread(make_tiny_engine(num_pages=128, page_size=4), str(tmp_path / "s.sock"))
    thread.start()
    yield thread
    thread.stop()
    assert thread.error is None


@pytest.fixture
def mounted():
    """(mount point, socket) of a tiny-model server mounted for real (tests/mount_helpers.py)."""
    yield from mounted_server()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny-model server in a thread, and the OpenAI LIP on it: (thread, base URL)."""
    from tests.openai_helpers import start_lip, stop_lip
    from tests.server_helpers import ServerThread

    folder = tmp_path_factory.mktemp("openai")
    thread = ServerThread(make_tiny_engine(num_pages=1024, page_size=4), str(folder / "s.sock"))
    thread.start()
    log = folder / "lip.log"
    lip, url = start_lip(thread.server.config.socket_path, log)
    yield thread, url
    stop_lip(lip, log)
    thread.stop()
    assert thread.error is None


@pytest.fixture(scope="module")
def client(served):
    import openai

    return openai.OpenAI(base_url=served[1], api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def tiny_socket(tmp_path_factory):
    """The socket of a tiny-model server in a thread (1,024 pages of 4), for the program
    library's tests (tests/program_helpers.py loads an example to run on it)."""
    from tests.server_helpers import ServerThread

    folder = tmp_path_factory.mktemp("programs")
    thread = ServerThread(make_tiny_engine(num_pages=1024, page_size=4), str(folder / "s.sock"))
    thread.start()
    yield thread.server.config.socket_path
    thread.stop()
    assert thread.error is None
