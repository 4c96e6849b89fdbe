"""Errors the engine raises: one class per kind, each with a message a user can act on."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class LoadError(EngineError):
    """A model file could not be loaded (missing, not a model, unsupported)."""


class OutOfPagesError(EngineError):
    """The page pool has no free page left."""
