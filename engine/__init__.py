"""The inference engine: weights, tokenizer, page pool, batched forward, sampling.

Knows nothing of trio, FUSE or processes (DESIGN.md, "The house").
"""

from symphony.engine.config import EngineConfig, ModelConfig
from symphony.engine.errors import EngineError, LoadError

__all__ = ["EngineConfig", "EngineError", "LoadError", "ModelConfig"]
