"""TEI-compatible routes, and token-id input (shared with /v1/embeddings).

text-embeddings-inference (TEI), Hugging Face's embedding server, serves this very model; its clients work against
this server unchanged:

- `POST /embed`, and `POST /` (TEI's route for the model it serves, and where huggingface_hub's
  `InferenceClient(base_url=...).feature_extraction` posts): `{"inputs", "truncate", "truncation_direction",
  "normalize", "prompt_name", "dimensions"}` answers a JSON list of vectors.
- `GET /info`: the model and the server's limits, in TEI's fields.
- `POST /tokenize` with TEI's body (`inputs`, `add_special_tokens`): the path is app.py's, which hands TEI's shape
  to `tei_tokenize`.
- `GET /api-doc/openapi.json`: these routes' schema, where TEI serves its own.

Errors on the TEI routes are TEI's, `{"error": str, "error_type": str}`, with TEI's statuses: 400 Empty, 413
Validation (too many inputs, a text over the limit with truncation off), 422 Validation (a malformed body), 424
Backend, 429 Overloaded, 503 Unhealthy. What the server's guards refuse before any route runs (401, 408, 413 for a
body over --max-body-bytes, 503 busy) stays in the OpenAI shape on every path, as does everything on /tokenize.

Token ids cannot say which vocabulary they come from: an OpenAI client's tiktoken ids are valid-looking integers
that would embed as garbage. They are refused unless the operator starts the server with --accept-token-ids
(`ServeConfig.accept_token_ids`); then they are this model's own word-piece ids, the whole input as /tokenize gives
it, special tokens included (as TEI takes ids: nothing is added).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

import anyio
import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.params import Depends
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from allmpnet import __version__
from allmpnet.encode import Encoder, NonFiniteOutputError, Tokenized
from allmpnet.serve.errors import APIError, ClientGone, describe_unreadable, describe_validation_error, log
from allmpnet.serve.responses import JSONResponse
from allmpnet.serve.schemas import TeiEmbedRequest, TokenizeRequest, as_texts, is_token_id, json_type, token_id_rows

if TYPE_CHECKING:
    from allmpnet.serve.app import Service

# above this many ids in one request, check them off the event loop so other requests keep flowing
CHECK_INLINE_IDS = 100_000
# texts tokenized whole at once for left truncation: the library holds every piece of them, with offsets
WHOLE_CHUNK = 16
# JSON bytes of one token of TEI's /tokenize answer, at most, less its text ({"id":30526,"text":"","special":false,
# "start":20000,"stop":20000},); the text, a slice of the input, is at most 6 bytes a character (\u001f)
TEI_TOKEN_JSON_BYTES, TEXT_JSON_BYTES = 80, 6
# TEI's names for what /info reports as model_dtype
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "int8", "bf16+int8": "bfloat16+int8"}
# our errors' codes that TEI has its own error_type (and status) for
TEI_ERROR_TYPES = {"queue_full": (429, "Overloaded"), "shutting_down": (503, "Unhealthy"),
                   "empty_batch": (400, "Empty")}

# the refusal's code: the generic one, which clients and tests already match on for a malformed input
NOT_ACCEPTED_CODE = "invalid_request"
NOT_ACCEPTED = ("token-id input is not supported by default: {field} holds token ids (lists of integers), and this "
                "server tokenizes text itself; ids cannot say which vocabulary they come from, so another tokenizer's "
                "ids would give wrong vectors without any error. {hint}If your client sends this model's own "
                "word-piece ids (as /tokenize gives them, special tokens included), start the server with "
                "--accept-token-ids.")
LANGCHAIN_HINT = ("LangChain's OpenAIEmbeddings sends tiktoken (OpenAI) ids by default: construct it with "
                  "check_embedding_ctx_length=False and it sends the text. ")


# ---------------------------------------------------------------- errors in TEI's shape

def tei_error(status: int, message: str, error_type: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # a message may quote the request and so hold code points UTF-8 cannot encode
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


def api_error_as_tei(e: APIError) -> JSONResponse:
    status, error_type = TEI_ERROR_TYPES.get(e.code or "", (e.status, None))
    if error_type is None:
        error_type = "Backend" if status >= 500 else "Validation"
        status = 424 if status >= 500 else status  # TEI's status for a failed inference
    return tei_error(status, e.message, error_type, e.headers)


class TeiRoute(APIRoute):
    """A route whose failures answer in TEI's error shape, validation of the body included."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def answer_in_tei_shape(request: Request) -> Response:
            try:
                return await handler(request)
            except APIError as e:
                return api_error_as_tei(e)
            except RequestValidationError as e:
                errors = e.errors()
                message = describe_validation_error(errors[0])[0] if errors else "invalid request"
                if len(errors) > 1:
                    message += f" (and {len(errors) - 1} more problem(s))"
                return tei_error(422, message, "Validation")
            except StarletteHTTPException as e:
                # the framework could not read the body; anything else is a guard's refusal while the body
                # streamed in (too large, too slow), answered in the OpenAI shape on every path
                if e.status_code == 400 and e.__cause__ is not None and not isinstance(e.__cause__, ClientDisconnect):
                    return tei_error(422, f"the body is not UTF-8 JSON ({describe_unreadable(e.__cause__)})",
                                     "Validation")
                raise
            except NonFiniteOutputError as e:
                log.error("%s", e)
                return tei_error(424, str(e), "Backend")

        return answer_in_tei_shape


# ---------------------------------------------------------------- token ids

def require_token_ids_accepted(service: "Service", field: str, hint: str = "") -> None:
    if not service.config.accept_token_ids:
        raise APIError(422, NOT_ACCEPTED.format(field=field, hint=hint), NOT_ACCEPTED_CODE, field)


def vocab_size(encoder: Encoder) -> int:
    """How many token ids the model has an embedding for (its config's vocab_size)."""
    return encoder.model.network.cfg.vocab_size


def check_token_ids(rows: list, field: str, vocab: int) -> None:
    """Every row a non-empty list of integers in [0, vocab); an APIError naming the first that is not."""
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise APIError(422, f"{field}[{i}] is {json_type(row)}, expected a list of token ids", "invalid_token_ids",
                           field)
        if not row:
            raise APIError(422, f"{field}[{i}] is an empty list: a text's ids hold at least its special tokens",
                           "invalid_token_ids", field)
        if not all(map(is_token_id, row)):
            j, value = next((j, v) for j, v in enumerate(row) if not is_token_id(v))
            what = repr(value) if isinstance(value, float) else json_type(value)
            raise APIError(422, f"{field}[{i}][{j}] is {what}, expected a token id (an integer)", "invalid_token_ids",
                           field)
        if min(row) < 0 or max(row) >= vocab:
            j, value = next((j, v) for j, v in enumerate(row) if not 0 <= v < vocab)
            raise APIError(422, f"{field}[{i}][{j}] is {value}: this model's token ids run from 0 to {vocab - 1}",
                           "invalid_token_ids", field)


def fit_ids(ids: list[int], limit: int, opening: list[int], closing: list[int], left: bool = False) -> list[int]:
    """ids cut to `limit` the way the tokenizer cuts a text: a leading <s> and a trailing </s> stay, the word
    pieces between them lose their end (or their start, with `left`). Ids without them are simply cut."""
    if len(ids) <= limit:
        return ids
    head = opening if opening and ids[:len(opening)] == opening else []
    tail = closing if closing and ids[len(ids) - len(closing):] == closing else []
    pieces = ids[len(head): len(ids) - len(tail)]
    room = max(0, limit - len(head) - len(tail))
    pieces = pieces[len(pieces) - room:] if left else pieces[:room]
    return head + pieces + tail


async def tokenized_ids(service: "Service", rows: list, field: str, truncate: bool | None,
                        left: bool = False) -> Tokenized:
    """Token-id rows checked, and cut at max_seq_length (or refused with 413 when truncation is off)."""
    encoder, config = service.encoder, service.config
    if len(rows) > config.max_items:
        raise APIError(413, f"{len(rows)} texts in one request; this server takes at most {config.max_items}: "
                            "split the request", "too_many_items", field)
    if sum(map(len, rows)) > CHECK_INLINE_IDS:
        await anyio.to_thread.run_sync(check_token_ids, rows, field, vocab_size(encoder))
    else:
        check_token_ids(rows, field, vocab_size(encoder))
    limit = encoder.max_seq_length
    over = [i for i, row in enumerate(rows) if len(row) > limit]
    if over and not (config.truncate if truncate is None else truncate):
        raise APIError(413, f"{len(over)} input(s) have more than the model's limit of {limit} token ids and "
                            f"truncation is off: {field}{over[:10]}{' …' if len(over) > 10 else ''}",
                       "text_too_long", field)
    opening, closing = encoder.tokenizer.special_ids
    ids = [fit_ids(row, limit, opening, closing, left) if len(row) > limit else row for row in rows]
    return Tokenized(ids, [len(row) > limit for row in rows])


def vector_answer_bytes(service: "Service", n: int) -> int:
    """What an answer of n vectors may take as JSON: the charge for it (Service.charge_answer)."""
    from allmpnet.serve.app import FLOAT_JSON_BYTES  # app.py imports this module
    return n * service.encoder.dim * FLOAT_JSON_BYTES


async def embed_token_ids(service: "Service", rows: list, field: str,
                          truncate: bool | None) -> tuple[torch.Tensor, Tokenized]:
    """/v1/embeddings' token-id input: refused unless --accept-token-ids, else checked, cut and embedded."""
    require_token_ids_accepted(service, field, LANGCHAIN_HINT)
    tokenized = await tokenized_ids(service, rows, field, truncate)
    await service.charge_answer(vector_answer_bytes(service, len(rows)))  # once checked: a refusal costs nothing
    return await service.embed_tokenized(tokenized), tokenized


# ---------------------------------------------------------------- texts

def keep_tails(encoder: Encoder, texts: list[str]) -> list[list[int]]:
    """Each text's last word pieces within max_seq_length, between its special tokens (truncation from the left)."""
    opening, closing = encoder.tokenizer.special_ids
    room = max(0, encoder.max_seq_length - len(opening) - len(closing))
    out = []
    for start in range(0, len(texts), WHOLE_CHUNK):
        for encoding in encoder.tokenizer.tokenize_whole(texts[start:start + WHOLE_CHUNK]):
            out.append(opening + encoding.ids[len(encoding.ids) - room:] + closing)
    return out


async def tokenized_texts(service: "Service", texts: list[str], field: str, truncate: bool | None,
                          left: bool) -> Tokenized:
    """Texts that passed Service.check_limits, tokenized and cut from the end or (left) the start; the caller
    has charged the request for its answer (Service.tokenize would charge for a listing of the ids)."""
    tokenized = await service._tokenize(texts, field, truncate)
    cut = [i for i, t in enumerate(tokenized.truncated) if t]
    if left and cut:
        # the tokenizer keeps a text's start; its end needs the text tokenized whole (off the event loop)
        tails = await anyio.to_thread.run_sync(keep_tails, service.encoder, [texts[i] for i in cut])
        for i, ids in zip(cut, tails):
            tokenized.ids[i] = ids
    return tokenized


async def tokenized_inputs(service: "Service", items: list, truncate: bool | None, left: bool) -> Tokenized:
    """TEI's `inputs`: strings and token-id lists, possibly mixed, as one Tokenized in their order; the request
    is charged for its vectors once every check has passed."""
    at_text = [i for i, v in enumerate(items) if isinstance(v, str)]
    at_ids = [i for i, v in enumerate(items) if not isinstance(v, str)]
    texts = [items[i] for i in at_text]
    # in a mixed batch, errors count the strings and the id lists apart: say so in the field they name
    mixed = bool(at_text) and bool(at_ids)
    text_field, ids_field = ("inputs (its strings)", "inputs (its id lists)") if mixed else ("inputs", "inputs")
    if at_ids:
        require_token_ids_accepted(service, "inputs")
    service.check_limits(texts, text_field)
    parts = []
    if at_ids:
        parts.append((at_ids, await tokenized_ids(service, [items[i] for i in at_ids], ids_field, truncate, left)))
    await service.charge_answer(vector_answer_bytes(service, len(items)))
    if at_text:
        parts.append((at_text, await tokenized_texts(service, texts, text_field, truncate, left)))
    ids: list[list[int]] = [[] for _ in items]
    truncated = [False] * len(items)
    for positions, part in parts:
        for position, row, cut in zip(positions, part.ids, part.truncated):
            ids[position], truncated[position] = row, cut
    return Tokenized(ids, truncated)


# ---------------------------------------------------------------- the routes

def pooling_name(encoder: Encoder) -> str:
    names = {"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max", "mean_sqrt_len_tokens": "mean_sqrt_len"}
    return "+".join(names.get(mode, mode) for mode in encoder.pooling.modes)


def info(service: "Service") -> dict:
    encoder, config = service.encoder, service.config
    return {
        "model_id": config.model_name,
        "model_sha": None,
        "model_dtype": DTYPES.get(encoder.precision, encoder.precision),
        "model_type": {"embedding": {"pooling": pooling_name(encoder)}},
        # requests are bounded by the texts waiting (each request holds one at least) and by the bytes in flight
        "max_concurrent_requests": config.max_queue,
        "max_input_length": encoder.max_seq_length,
        "max_batch_tokens": service.batcher.budget.max_tokens,
        "max_batch_requests": config.max_batch_size,
        "max_client_batch_size": config.max_items,
        "auto_truncate": config.truncate,
        # the tokenizer library spreads a request's texts over this many threads
        "tokenization_workers": os.cpu_count() or 1,
        "version": __version__,
        "sha": None,
        "docker_label": None,
    }


def embed_inputs(service: "Service", body: TeiEmbedRequest) -> list:
    """/embed's inputs as a list (a string or an id list alone is one input), once what it refuses before any work
    has passed: options this server cannot honour, and the batch's size."""
    encoder, config = service.encoder, service.config
    if body.prompt_name is not None:
        raise APIError(422, f"prompt_name {body.prompt_name!r} is not available: this server applies no prompts "
                            f"({config.model_name} has none)", "prompt_not_found", "prompt_name")
    if body.dimensions is not None and body.dimensions != encoder.dim:
        raise APIError(422, f"dimensions={body.dimensions} is not available: {config.model_name} gives "
                            f"{encoder.dim}-d vectors", "invalid_dimensions", "dimensions")
    items = [body.inputs] if isinstance(body.inputs, str) else token_id_rows(body.inputs) or body.inputs
    if not items:
        raise APIError(400, "`inputs` cannot be empty", "empty_batch", "inputs")
    if len(items) > config.max_items:
        raise APIError(413, f"batch size {len(items)} > maximum allowed batch size {config.max_items}",
                       "too_many_items", "inputs")
    return items


async def tei_embed(service: "Service", body: TeiEmbedRequest) -> JSONResponse:
    items = embed_inputs(service, body)
    left = body.truncation_direction.lower() == "left"
    try:
        if not left and all(isinstance(v, str) for v in items):  # the common case: texts cut at their end
            vectors, _ = await service.embed(items, "inputs", body.truncate, body.normalize)
        else:
            tokenized = await tokenized_inputs(service, items, body.truncate, left)
            vectors = await service.embed_tokenized(tokenized, body.normalize)
    except (APIError, ClientGone, NonFiniteOutputError):
        raise
    except Exception as e:  # the forward pass failed: TEI's backend error, and the server keeps serving
        log.exception("the embedding batch failed")
        raise APIError(500, f"the model failed on this batch: {type(e).__name__}: {e}", "backend_error") from None
    return JSONResponse(vectors.numpy())


async def tei_tokenize(service: "Service", body: TokenizeRequest) -> JSONResponse:
    """TEI's /tokenize: per input, its tokens as {"id", "text", "special", "start", "stop"} (character offsets into
    the input; null for special tokens). Called from app.py's /tokenize, so errors keep the OpenAI shape there.

    TEI lists every piece of a text; here a text longer than the model reads is refused (413) rather than listed
    in part or at any length (an answer's size is bounded by max_seq_length pieces per text)."""
    texts = as_texts(body.inputs, "inputs")
    if body.prompt_name is not None:
        raise APIError(422, f"prompt_name {body.prompt_name!r} is not available: this server applies no prompts",
                       "prompt_not_found", "prompt_name")
    tokenized = await service.tokenize(texts, "inputs", truncate=True)  # charged for a listing of its ids
    over = [i for i, t in enumerate(tokenized.truncated) if t]
    if over:
        raise APIError(413, f"{len(over)} text(s) have more word pieces than the model reads "
                            f"({service.encoder.max_seq_length} with its special tokens): inputs{over[:10]}"
                            f"{' …' if len(over) > 10 else ''}. Split them, or send this server's body "
                            "{\"input\": ...}, which lists the pieces the model reads and says which texts were "
                            "cut", "text_too_long", "inputs")
    from allmpnet.serve.app import TOKEN_JSON_BYTES
    # TEI's tokens are larger than that listing's, and each carries its slice of the text
    await service.charge_answer(int(tokenized.lengths.sum()) * (TEI_TOKEN_JSON_BYTES - TOKEN_JSON_BYTES)
                                + sum(map(len, texts)) * TEXT_JSON_BYTES)
    encodings = await anyio.to_thread.run_sync(service.encoder.tokenizer.tokenize_whole, texts)
    tokenizer = service.encoder.tokenizer
    opening, closing = tokenizer.special_ids if body.add_special_tokens is not False else ([], [])

    def special(token_id: int) -> dict:
        return {"id": token_id, "text": tokenizer.id_to_token(token_id), "special": True, "start": None,
                "stop": None}

    answer = []
    for text, encoding in zip(texts, encodings):
        tokens = [special(t) for t in opening]
        # a special token written in the text ("<s>") is listed as text, with its offsets, as TEI lists it
        tokens.extend({"id": token_id, "text": text[start:stop], "special": False, "start": start, "stop": stop}
                      for token_id, (start, stop) in zip(encoding.ids, encoding.offsets))
        tokens.extend(special(t) for t in closing)
        answer.append(tokens)
    return JSONResponse(answer)


def register_tei_routes(app: FastAPI, service: "Service", guarded: list[Depends]) -> None:
    """Add TEI's routes to `app`. They stay out of /openapi.json, whose every error is the OpenAI shape; their own
    schema is at /api-doc/openapi.json."""

    async def embed(body: TeiEmbedRequest) -> JSONResponse:
        return await tei_embed(service, body)

    async def get_info() -> JSONResponse:
        return JSONResponse(info(service))

    documented = APIRouter()  # never mounted: the routes as their schema describes them
    routes = [("/embed", embed, "POST", "Embed texts, as TEI does"),
              ("/", embed, "POST", "Embed texts: TEI's route for the model it serves (InferenceClient posts here)"),
              ("/info", get_info, "GET", "The model and the server's limits, in TEI's fields")]
    for path, endpoint, method, summary in routes:
        app.router.add_api_route(path, endpoint, methods=[method], dependencies=guarded, include_in_schema=False,
                                 route_class_override=TeiRoute, summary=summary)
        documented.add_api_route(path, endpoint, methods=[method], summary=summary)
    schema: dict = {}

    async def tei_schema() -> JSONResponse:
        if not schema:
            schema.update(get_openapi(title=f"{app.title}: TEI-compatible routes", version=app.version,
                                      routes=documented.routes,
                                      description="text-embeddings-inference's API; errors are "
                                                  '{"error": str, "error_type": str}'))
        return JSONResponse(schema)

    app.router.add_api_route("/api-doc/openapi.json", tei_schema, methods=["GET"], dependencies=guarded,
                             include_in_schema=False, route_class_override=TeiRoute)
