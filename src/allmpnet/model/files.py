"""Reading a model directory's small files: any damage is one `ModelFileError` that names the file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from allmpnet.errors import AllmpnetError


class ModelFileError(AllmpnetError, ValueError):
    """A file of a model directory that is missing, not valid JSON, or holds values a model cannot have."""


def read_json(path: Path, kind: type | tuple[type, ...] = dict) -> Any:
    """The JSON value in path, which must be of `kind`; a ModelFileError naming the file otherwise."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(f"{path} not found") from None
    except UnicodeDecodeError as e:
        raise ModelFileError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except OSError as e:
        raise ModelFileError(f"{path} cannot be read ({e.strerror or e})") from None
    if not isinstance(value, kind):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        names = {"dict": "a JSON object", "list": "a JSON list"}
        raise ModelFileError(f"{path} holds {_json_kind(value)}, expected {names.get(expected, expected)}")
    return value


def _json_kind(value: Any) -> str:
    return {dict: "a JSON object", list: "a JSON list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
