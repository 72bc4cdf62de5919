"""The ``Gateway`` deployment: the OpenAI-compatible HTTP API (FastAPI) in front of the
``VisionEncoder`` and ``LanguageModel`` handles: auth, limits, request validation, prompt building,
streaming (SSE), and what a client sees when a model replica is lost.

A request's image embeddings go from the encoder to the language model as ``DeploymentResponse``
arguments: Ray passes them between the two replicas without routing the tensors through the gateway.
"""

import asyncio
import hmac
import json
import logging
import os
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import TaskCancelledError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from llava_platform.config.schema import ServeConfig
from llava_platform.inference.prompts import PromptBuilder
from llava_platform.inference.requests import DecodeRequest, StepOutput
from llava_platform.serve import inputs, stall, web
from llava_platform.serve.metrics import GatewayMetrics
from llava_platform.serve.protocol import (ApiError, chunk_body, completion_body, completion_id, models_body,
                                           parse_request, usage)
from llava_platform.serve.replica import replica_gone

logger = logging.getLogger("ray.serve")
API_KEY_ENV = "LLAVA_API_KEY"


def api_key(args: ServeConfig) -> bytes | None:
    """The key clients must send: ``api_key``, else the file ``api_key_file`` (one line; the node's
    path), else ``LLAVA_API_KEY`` in this process's environment; None: no auth.

    Raises:
        ValueError: ``api_key_file`` cannot be read or holds no key.
    """
    if args.api_key is not None:
        key = args.api_key.get_secret_value()
    elif args.api_key_file is not None:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                key = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"api_key_file {args.api_key_file!r} cannot be read on this node: {e}") from None
        if not key:
            raise ValueError(f"api_key_file {args.api_key_file!r} is empty; it must hold the API key")
    else:
        key = os.environ.get(API_KEY_ENV, "").strip()
    return key.encode() if key else None


class ObserveRequests:
    """ASGI middleware: each HTTP request's route (the matched path template, ``unmatched`` for
    none), method, status code and end-to-end time (to the response's last byte, so a stream counts
    until it ends) go to the Gateway's metrics (``app.state.metrics``). A ``receive`` that Serve ends
    with ``TaskCancelledError`` (the proxy gave the client up, as its stall guard does) reads as the
    client's disconnect, not as a server failure."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        metrics = getattr(scope["app"].state, "metrics", None) if scope["type"] == "http" else None
        if metrics is None:
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), [500]

        async def observed_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        async def observed_receive() -> dict:
            try:
                return await receive()
            except TaskCancelledError:  # Serve cancelled the proxy's receive call: the client went away
                return {"type": "http.disconnect"}

        try:
            await self.app(scope, observed_receive, observed_send)
        finally:  # also when the client went away mid-stream
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics.request(route, scope["method"], status[0], time.monotonic() - started)


api = FastAPI(title="llava-platform", docs_url=None, redoc_url=None, openapi_url=None)
api.add_middleware(ObserveRequests)


def _count_error(request: Request, err: ApiError) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.error(err.code)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    _count_error(request, exc)
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    err = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=str(exc.status_code))
    _count_error(request, err)
    return JSONResponse(err.body(), status_code=exc.status_code)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A server-side failure (never a bad request: those are ApiErrors): logged, and answered in
    OpenAI's error shape without internals."""
    logger.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    err = ApiError(500, f"the server failed to handle the request ({type(exc).__name__}); see the Gateway log",
                   code="internal_error")
    _count_error(request, err)
    return JSONResponse(err.body(), status_code=500)


def parse_json(raw: bytes) -> Any:
    """A request body's JSON.

    Raises:
        ApiError: 400 for invalid JSON, nesting too deep to parse, or an integer too long to convert.
    """
    try:
        return json.loads(raw)
    except RecursionError as e:
        raise ApiError(400, "the request body is nested too deeply to parse", code="invalid_json") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer over Python's digit limit
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from e


def generation_failed(out: StepOutput) -> ApiError:
    """The error for a row that failed alone in the decode batch (its neighbours go on)."""
    return ApiError(500, f"generating this answer failed: {out.error}", code="generation_failed")


#: Seconds a client is told to wait (``Retry-After``) when no model replica can take its request.
RETRY_AFTER_S = 5


@serve.deployment(name="Gateway", max_ongoing_requests=128, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class Gateway:
    """The OpenAI-compatible HTTP API: auth, limits, request validation, prompt building, SSE."""

    def __init__(self, encoder: DeploymentHandle, llm: DeploymentHandle, args: ServeConfig,
                 prompts: PromptBuilder):
        """``prompts``: the model's prompt builder (:func:`~llava_platform.serve.inputs.load_prompts`),
        made where the application is built: a replica unpickles a tokenizer, a template and numbers,
        and never imports torch or loads the model."""
        import httpx

        self.encoder, self.llm = encoder, llm
        self.model_name = args.model_name
        self.limits = inputs.Limits.from_config(args)
        self.prompts = prompts
        self.max_body = args.max_body_bytes
        self.replica_wait = args.replica_wait_timeout_s
        self.chat_page = args.chat_page
        self._api_key = api_key(args)
        self.http = httpx.AsyncClient(timeout=10.0)
        self.created = int(time.time())
        self.metrics = api.state.metrics = GatewayMetrics(args.model_name)
        if not stall.installed():  # a hint: the proxy's environment is the node's, which this replica shares
            logger.warning("this node's environment does not name the HTTP proxy's stall guard, so a client that "
                           "stops reading may keep its row decoding to max_tokens; start Ray with %s=%s (the "
                           "cluster files do)", stall.CALLBACK_ENV, stall.IMPORT_PATH)

    def _authorize(self, request: Request) -> None:
        if self._api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._api_key):
            raise ApiError(401, "Incorrect or missing API key: send it as `Authorization: Bearer <key>`.",
                           code="invalid_api_key")

    async def _body(self, request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body:
            raise ApiError(413, f"the request body is {declared} bytes, over the limit of {self.max_body}",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise ApiError(413, f"the request body is over the limit of {self.max_body} bytes", code="request_too_large")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw:
            raise ApiError(400, "the request body is empty; send a JSON object", code="invalid_json")
        # Parsing a large body is CPU work: off the event loop, so /healthz and other requests go on.
        return await asyncio.to_thread(parse_json, raw)

    async def _call(self, req: DecodeRequest, prompt: inputs.Prompt, stream: bool) -> AsyncIterator[StepOutput]:
        """The language model's output (streamed pieces, or one whole result). If a replica dies
        before anything was produced (killed, or its node went away), the request goes once more to
        the replicas that remain; if no replica takes it within ``replica_wait_timeout_s`` (none
        running, or all full), a 503 with ``Retry-After``."""
        for attempt in range(2):
            produced = finished = False
            feats = [self.encoder.encode.remote(img.key, img.pixels) for img in prompt.images]
            resp = self.llm.generate.options(stream=True).remote(req, *feats) if stream else self.llm.complete.remote(req, *feats)
            try:
                # Waits until a LanguageModel replica has taken the call (the images encoded first).
                assigned = await asyncio.wait_for(resp._to_object_ref_gen() if stream else resp._to_object_ref(),
                                                  self.replica_wait)
                if stream:
                    async for ref in assigned:
                        out = await ref
                        produced, finished = True, out.finish_reason is not None
                        yield out
                else:
                    out = await assigned
                    finished = True
                    yield out
                finished = True
                return
            except asyncio.TimeoutError:
                raise ApiError(503, f"no model replica could take the request within {self.replica_wait:g} s "
                               "(replicas starting or all busy); retry later", code="replica_unavailable",
                               retry_after=RETRY_AFTER_S) from None
            except Exception as e:
                gone = replica_gone(e)
                if not gone or produced or attempt:
                    if gone:
                        raise ApiError(503, "the model replica serving this request went away; retry",
                                       code="replica_unavailable", retry_after=RETRY_AFTER_S) from e
                    raise
                logger.warning("retrying a request after a replica failure: %s", type(e).__name__)
            finally:
                if not finished:  # the caller went away, or the call failed: stop it and its encodings
                    resp.cancel()
                    for f in feats:
                        f.cancel()

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    # The web chat page: public (it holds no secret); its API calls carry the key the user enters.
    @api.get("/")
    async def chat_page_html(self, request: Request) -> HTMLResponse:
        self._page_enabled(request)
        return HTMLResponse(web.page(request.scope.get("root_path", "")), headers=web.HEADERS)

    @api.get("/static/{name}")
    async def chat_page_asset(self, name: str, request: Request) -> Response:
        self._page_enabled(request)
        found = web.asset(name)
        if found is None:
            raise ApiError(404, f"GET {request.url.path}: no such file", code="404")
        return Response(found[0], media_type=found[1], headers=web.HEADERS)

    def _page_enabled(self, request: Request) -> None:
        if not self.chat_page:
            raise ApiError(404, f"GET {request.url.path}: the chat page is turned off (chat_page: false)", code="404")

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return models_body(self.model_name, self.created)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        arrival = time.time()
        self._authorize(request)
        chat = await asyncio.to_thread(parse_request, await self._body(request))
        if chat.model != self.model_name:
            raise ApiError(404, f"The model `{chat.model}` does not exist; this server serves `{self.model_name}`",
                           "model", "model_not_found")
        stops = chat.stop_strings()
        images = await inputs.load_images(chat, self.prompts.spec, self.limits, self.http)
        prompt = await asyncio.to_thread(inputs.build_prompt, self.prompts, chat, images)  # tokenizing: off the loop
        req = DecodeRequest(prompt.input_ids, prompt.max_new_tokens, chat.temperature, chat.top_p, chat.seed, stops,
                            arrival=arrival)
        cid, created, n_prompt = completion_id(), int(time.time()), len(prompt.input_ids)
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return StreamingResponse(self._sse(req, prompt, cid, created, n_prompt, include_usage),
                                     media_type="text/event-stream")
        async for out in self._call(req, prompt, stream=False):
            if out.finish_reason == "error":
                raise generation_failed(out)
            return completion_body(cid, self.model_name, out.text, out.finish_reason or "stop", n_prompt,
                                   out.completion_tokens, created)
        raise ApiError(503, "the language model returned nothing; retry", code="replica_unavailable")

    async def _sse(self, req: DecodeRequest, prompt: inputs.Prompt, cid: str, created: int, n_prompt: int,
                   include_usage: bool) -> AsyncIterator[str]:
        def event(body: dict[str, Any]) -> str:
            return f"data: {json.dumps(body)}\n\n"

        yield event(chunk_body(cid, self.model_name, created, {"role": "assistant", "content": ""}))
        n_completion = 0
        try:
            async for out in self._call(req, prompt, stream=True):
                if out.finish_reason == "error":
                    raise generation_failed(out)
                n_completion = out.completion_tokens
                delta = {"content": out.text} if out.text else {}
                yield event(chunk_body(cid, self.model_name, created, delta, out.finish_reason))
        except ApiError as e:
            self.metrics.error(e.code)
            yield event(e.body())
        except Exception as e:  # the status line is already sent: report in the stream
            logger.exception("stream failed")
            self.metrics.error("internal_error")
            yield event(ApiError(500, f"generation failed: {type(e).__name__}", code="internal_error").body())
        if include_usage:
            yield event(chunk_body(cid, self.model_name, created, None, usage_counts=usage(n_prompt, n_completion)))
        yield "data: [DONE]\n\n"
