"""Serving embeddings over HTTP: an OpenAI-compatible FastAPI app with dynamic batching.

Names load on first use, so `allmpnet --help` and the other commands work without the `serve` extra installed.
"""
from importlib import import_module

_EXPORTS = {"create_app": "app", "BatchStats": "batching", "BatcherClosed": "batching",
            "DynamicBatcher": "batching", "QueueFull": "batching", "ServeConfig": "config"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"allmpnet.serve.{_EXPORTS[name]}"), name)
