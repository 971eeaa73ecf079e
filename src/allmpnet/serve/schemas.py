"""Request bodies. Inputs are checked here for type; size limits depend on the server and are checked in app.py.

Every scalar field is strict: JSON gives the types exactly, so "768" for a number or "no" for a boolean is a
client's mistake to report, not a value to guess at (pydantic's lax mode would read "no" as false).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from allmpnet.encode.tokenizer import lone_surrogate_at


def is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def looks_like_token_ids(value: Any) -> bool:
    """A non-empty list of integers (one text's ids) or of lists (several texts' ids), as OpenAI's input takes."""
    return (isinstance(value, list) and bool(value)
            and (all(map(is_token_id, value)) or all(isinstance(v, list) for v in value)))


def token_id_rows(value: Any) -> list[list] | None:
    """The rows of a token-id input (one list per text, its items not yet checked), or None for text input."""
    if not looks_like_token_ids(value):
        return None
    return [value] if is_token_id(value[0]) else value


def as_texts(value: Any, field: str = "input") -> list[str]:
    """A string or a non-empty list of strings, as a list; anything else is a ValueError saying what is wrong."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ValueError(f"expected a string or a list of strings, got {json_type(value)}")
    if not value:
        raise ValueError("the list is empty: send at least one text")
    if looks_like_token_ids(value):
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


def field_error(field: str, message: str, data: Any, kind: str = "missing") -> ValidationError:
    """A validation error located at `field` (a model validator's own errors have no location)."""
    error = kind if kind == "missing" else PydanticCustomError(kind, message)
    return ValidationError.from_exception_data("request", [InitErrorDetails(type=error, loc=(field,), input=data)])


class TextsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    truncate: bool | None = None  # None: the server's --no-truncate setting decides

    @staticmethod
    def _texts(value: Any, field: str) -> Any:
        as_texts(value, field)
        return value


class LenientRequest(BaseModel):
    """A body whose unknown fields are ignored (clients of OpenAI's and TEI's APIs send their own extras).

    A field name that is not valid Unicode is still refused, as on every other route: ignoring it would answer
    200 to a body that the strict routes call malformed.
    """
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _field_names_are_unicode(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(isinstance(k, str) and lone_surrogate_at(k) is not None for k in data):
            # the type and empty location of the error pydantic gives a strict route for the same body
            raise PydanticCustomError("string_unicode", "a field name is not valid Unicode")
        return data


class TokenizeRequest(TextsRequest):
    """This server's {"input", "truncate"}, or TEI's {"inputs", "add_special_tokens", "prompt_name"}.

    Both shapes share the path, as both APIs put /tokenize there; the body says which one is meant.
    """
    input: str | list[Any] | None = None
    inputs: str | list[Any] | None = Field(None, description="TEI's shape: a string or a list of strings")
    add_special_tokens: bool | None = Field(None, description="TEI's shape only (default true)")
    prompt_name: str | None = Field(None, description="TEI's shape only; this server applies no prompts")

    @model_validator(mode="before")
    @classmethod
    def _one_shape(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if "input" not in data and "inputs" not in data:
            raise field_error("input", "", data)
        if "input" in data and "inputs" in data:
            raise field_error("inputs", "send `input` (this server's shape) or `inputs` (TEI's), not both", data,
                              "value_error")
        foreign = ("add_special_tokens", "prompt_name") if "input" in data else ("truncate",)
        for name in foreign:
            if name in data:
                raise field_error(name, f"{name} goes with `{'inputs' if 'input' in data else 'input'}`, not with "
                                        f"`{'input' if 'input' in data else 'inputs'}`: "
                                        "this server's /tokenize body is {\"input\", \"truncate\"} and TEI's is "
                                        "{\"inputs\", \"add_special_tokens\", \"prompt_name\"}", data, "value_error")
        return data

    @field_validator("input", "inputs", mode="before")
    @classmethod
    def _check_input(cls, value: Any, info) -> Any:
        return cls._texts(value, info.field_name)


class EmbeddingsRequest(LenientRequest):
    # unknown fields are ignored here, as OpenAI-compatible clients may send their own extras
    input: str | list[Any] = Field(description="a string, a list of strings, or token ids: a list of integers "
                                               "(one text) or a list of lists (several); ids need the server's "
                                               "--accept-token-ids")
    truncate: bool | None = None  # None: the server's --no-truncate setting decides
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    # quantized vectors (encode/quantize.py): JSON integers with encoding_format "float", their raw bytes in base64
    embedding_type: Literal["float", "int8", "uint8", "binary", "ubinary"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _check_input(cls, value: Any) -> Any:
        if token_id_rows(value) is None:  # token ids are checked by the route: whether it takes them comes first
            as_texts(value, "input")
        return value


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


class TeiEmbedRequest(LenientRequest):
    """TEI's POST /embed (and POST /, where TEI serves an embedding model): unknown fields are ignored, as TEI does."""
    inputs: str | list[Any] = Field(description="a string, a list of strings; token ids (a list of integers, or "
                                                "lists of them among the strings) need --accept-token-ids")
    truncate: bool | None = Field(None, description="null: the server's setting (/info's auto_truncate)")
    truncation_direction: Literal["right", "left", "Right", "Left"] = "right"
    normalize: bool = True
    prompt_name: str | None = None
    dimensions: int | None = None
    # huggingface_hub's InferenceClient may send it; only floats come back from TEI's routes
    encoding_format: Literal["float"] | None = None

    @field_validator("inputs", mode="before")
    @classmethod
    def _check_inputs(cls, value: Any) -> Any:
        if isinstance(value, str) or token_id_rows(value) is not None:
            return value
        if not isinstance(value, list):
            raise ValueError(f"expected a string, a list of strings or token ids, got {json_type(value)}")
        for i, v in enumerate(value):  # TEI takes strings and id lists mixed in one batch
            if not isinstance(v, (str, list)):
                raise ValueError(f"inputs[{i}] is {json_type(v)}, expected a string (or a list of token ids)")
        return value
