"""Request bodies. Inputs are checked here for type; size limits depend on the server and are checked in app.py."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def as_texts(value: Any, field: str = "input") -> list[str]:
    """A string or a non-empty list of strings, as a list; anything else is a ValueError saying what is wrong."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ValueError(f"expected a string or a list of strings, got {json_type(value)}")
    if not value:
        raise ValueError("the list is empty: send at least one text")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value) or all(isinstance(v, list) for v in value):
        # OpenAI also takes token ids, but ids from another tokenizer would embed garbage here
        raise ValueError("token-id input is not supported: this server tokenizes text itself, send strings")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise ValueError(f"{field}[{i}] is {json_type(v)}, expected a string")
    return value


def json_type(value: Any) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", dict: "an object",
             list: "a list", str: "a string"}
    return names.get(type(value), type(value).__name__)


class TextsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    truncate: bool | None = None  # None: the server's --no-truncate setting decides

    @staticmethod
    def _texts(value: Any, field: str) -> Any:
        as_texts(value, field)
        return value


class TokenizeRequest(TextsRequest):
    input: str | list[Any]

    @field_validator("input", mode="before")
    @classmethod
    def _check_input(cls, value: Any) -> Any:
        return cls._texts(value, "input")


class EmbeddingsRequest(TokenizeRequest):
    # unknown fields are ignored here, as OpenAI-compatible clients may send their own extras
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    # quantized vectors (encode/quantize.py): JSON integers with encoding_format "float", their raw bytes in base64
    embedding_type: Literal["float", "int8", "uint8", "binary", "ubinary"] = "float"
    dimensions: int | None = None
    user: str | None = None


class SimilarityRequest(TextsRequest):
    a: str | list[Any]
    b: str | list[Any]

    @field_validator("a", "b", mode="before")
    @classmethod
    def _check_texts(cls, value: Any, info) -> Any:
        return cls._texts(value, info.field_name)


class SearchRequest(TextsRequest):
    query: str | list[Any]
    k: int = Field(10, ge=1)

    @field_validator("query", mode="before")
    @classmethod
    def _check_query(cls, value: Any) -> Any:
        return cls._texts(value, "query")
