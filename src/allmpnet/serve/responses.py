"""The JSON response every route answers with, rendered by orjson.

Writing 768 floats per vector was most of the event loop's time with the standard encoder (about two thirds of
it at 16 clients x 8 sentences, and all of it waits in line with other requests). orjson writes numpy arrays as
they are: a float32 becomes its shortest decimal form that reads back as the same float32, so a client that casts
the numbers to float32 gets the encoder's bits, in fewer bytes than the float64 digits `tolist()` gave.
"""
from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse as StarletteJSONResponse


class JSONResponse(StarletteJSONResponse):
    """starlette's JSONResponse, rendered by orjson; content may hold numpy arrays and numbers."""

    def render(self, content: Any) -> bytes:
        # NaN and infinity would come out as null: the encoder refuses non-finite vectors before they get here
        # (NonFiniteOutputError), and every other float a route returns is a finite score
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
