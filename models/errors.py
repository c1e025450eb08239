"""Errors raised while reading a model: the reason is in the message."""

from __future__ import annotations


class ModelLoadError(ValueError):
    """A model we cannot load (missing files, bad tensors, unknown model), with the reason."""


class ModelConfigError(ModelLoadError):
    """A model config we cannot use, with the reason in the message."""
