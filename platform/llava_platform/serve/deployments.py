"""The three Ray Serve deployments: ``VisionEncoder`` and ``LanguageModel`` (each autoscaled on its
own, each batching concurrent calls with ``@serve.batch``) and the FastAPI ``Gateway`` that speaks
the OpenAI API and holds handles to the other two.

A request's image embeddings go from the encoder to the language model as ``DeploymentResponse``
arguments: Ray passes them between the two replicas without routing the tensors through the gateway.
"""


import asyncio
import hmac
import json
import logging
import os
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from llava_platform.config.schema import ModelSpec, ServeConfig
from llava_platform.data.images import Decoding
from llava_platform.serve import inputs, web
from llava_platform.serve.metrics import EncoderMetrics, GatewayMetrics, LanguageModelMetrics
from llava_platform.data.images import ImageSpec
from llava_platform.inference.engine import (DecodeRequest, Decoder, ImageEncoderCore, StepOutput, drop_modules,
                                             load_for_serving)
from llava_platform.serve.protocol import (ApiError, chunk_body, completion_body, completion_id, models_body,
                                           parse_request, usage)
from llava_platform.tracking.runs import use_tracking_uri

logger = logging.getLogger("ray.serve")
API_KEY_ENV = "LLAVA_API_KEY"


def _load(args: ServeConfig) -> tuple[Any, Any]:
    use_tracking_uri(args.tracking_uri)
    return load_for_serving(args.model, args.storage, args.dtype)


def _replica_id() -> str:
    return serve.get_replica_context().replica_id.unique_id


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


class _Unhealthy:
    """Records an internal failure (not a bad request) so ``check_health`` fails and Serve replaces
    the replica."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def check(self) -> None:
        if self.reason:
            raise RuntimeError(self.reason)


# Defaults fit the embedded default on a 2-CPU machine (0.25 + 0.5 + 1 CPU); the Serve config
# YAML overrides them per deployment. LanguageModel's max_ongoing_requests sits above the default
# max_batch_size (16) so that a full batch can form (Serve's own default of 5 capped it at 5 rows).
@serve.deployment(name="VisionEncoder", max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.5})
class VisionEncoder:
    """Images -> projected image embeddings. Concurrent calls are batched; an LRU cache keyed by the
    image's content hash (and a table of encodes in flight) means a repeated image skips the tower."""

    def __init__(self, args: ServeConfig):
        model, processor = _load(args)
        spec = ImageSpec.from_model(model.config, processor, args.image_aspect_ratio, Decoding.from_config(args))
        self.core = ImageEncoderCore(drop_modules(model, "vision"), spec)
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cache_size = args.encoder_cache_size
        self.inflight: dict[str, asyncio.Future] = {}
        self.counts = {"requests": 0, "encoded": 0, "cache_hits": 0, "batches": 0}
        self.metrics = EncoderMetrics(args.model_name)
        self.cache_bytes = 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
        self.health = _Unhealthy()
        self._encode_batch.set_max_batch_size(args.encoder_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(args.encoder_batch_wait_timeout_s)

    async def encode(self, key: str, pixels: np.ndarray) -> torch.Tensor:
        """The ``[num_tokens, hidden]`` embeddings of one prepared image (``key``: content hash)."""
        self.counts["requests"] += 1
        if key in self.cache:
            self.counts["cache_hits"] += 1
            self.metrics.hits.inc()
            self.cache.move_to_end(key)
            return self.cache[key]
        if key in self.inflight:  # the same image is being encoded for another request
            self.counts["cache_hits"] += 1
            self.metrics.hits.inc()
            return await asyncio.shield(self.inflight[key])
        self.metrics.misses.inc()
        future = asyncio.ensure_future(self._encode_batch(pixels))
        self.inflight[key] = future
        try:
            feats = await asyncio.shield(future)
        finally:
            self.inflight.pop(key, None)
        if self.cache_size and key not in self.cache:
            self.cache[key] = feats
            self.cache_bytes += feats.nbytes
            while len(self.cache) > self.cache_size:
                self.cache_bytes -= self.cache.popitem(last=False)[1].nbytes
            self.metrics.cache_size(len(self.cache), self.cache_bytes)
        return feats

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _encode_batch(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        self.counts["batches"] += 1
        self.counts["encoded"] += len(images)
        started = time.monotonic()
        try:
            feats = await asyncio.get_running_loop().run_in_executor(self.pool, self.core, images)
            self.metrics.encoded.inc(len(images))
            self.metrics.latency.observe(time.monotonic() - started)
            return feats
        except Exception as e:
            self.health.reason = f"vision encoder failed: {type(e).__name__}: {e}"
            raise

    def stats(self) -> dict[str, Any]:
        """This replica's counters: ``encoded`` is the number of images that ran through the vision
        tower, ``cache_hits`` the calls answered from the cache (or from an encode in flight)."""
        return dict(self.counts, cached=len(self.cache), replica=_replica_id())

    def check_health(self) -> None:
        self.health.check()


@serve.deployment(name="LanguageModel", max_ongoing_requests=32, ray_actor_options={"num_cpus": 1})
class LanguageModel:
    """Prompt ids + image embeddings -> text, streamed (``generate``) or whole (``complete``).

    Concurrent calls decode together. ``@serve.batch`` groups the calls that arrive within
    ``batch_wait_timeout_s``; each group is prefilled and joins the batch that is already decoding
    at the next step (continuous batching, up to ``max_batch_size`` rows), and a finished row leaves
    at once. So a request never waits for another request's whole answer.
    """

    def __init__(self, args: ServeConfig):
        model, processor = _load(args)
        self.decoder = Decoder(drop_modules(model, "language"), processor.tokenizer)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        self.max_rows = args.max_batch_size
        self.waiting: list[tuple[list[tuple[DecodeRequest, list[torch.Tensor]]], asyncio.Queue]] = []
        self.driver: asyncio.Task | None = None
        self.counts = {"requests": 0, "batches": 0, "rows": 0, "max_batch": 0, "cancelled": 0, "errors": 0}
        self.metrics = LanguageModelMetrics(args.model_name)
        self.health = _Unhealthy()
        self._decode_batch.set_max_batch_size(args.max_batch_size)
        self._decode_batch.set_batch_wait_timeout_s(args.batch_wait_timeout_s)

    async def generate(self, request: DecodeRequest, *features: torch.Tensor) -> AsyncIterator[StepOutput]:
        """Stream one request's output, piece by piece (call with ``.options(stream=True)``).

        Raises:
            ValueError: the prompt's image tokens do not match the embeddings given.
        """
        self.decoder.check(request, features)
        self.counts["requests"] += 1
        request.received = time.monotonic()
        # Times are measured from the request's arrival at the Gateway (its wall clock, sent along).
        since_arrival = max(time.time() - request.arrival, 0.0) if request.arrival else 0.0
        origin = request.received - since_arrival
        reason, tokens, first, last = "cancelled", 0, None, None
        try:
            async for out in self._decode_batch((request, list(features))):
                if out.completion_tokens > tokens:
                    last = time.monotonic() - origin
                    first = last if first is None else first
                    tokens = out.completion_tokens
                if out.finish_reason is not None:
                    reason = out.finish_reason
                if out.text or out.finish_reason:
                    yield out
        except Exception:
            reason = "error"
            raise
        finally:
            if reason == "cancelled":  # the caller went away (client disconnected, Stop pressed): free the row
                request.cancelled = True
            self.metrics.finish(reason, len(request.input_ids), tokens, first, last)

    async def complete(self, request: DecodeRequest, *features: torch.Tensor) -> StepOutput:
        """One request's whole output in one reply (no per-token messages between replicas)."""
        text, last = "", StepOutput("", 0, "stop")
        async for out in self.generate(request, *features):
            text, last = text + out.text, out
        return StepOutput(text, last.completion_tokens, last.finish_reason, last.error, last.batch_rows)

    # Ray forms the next group while earlier ones decode; _drive merges them all into one batch.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, max_concurrent_batches=1024)
    async def _decode_batch(self, items: list[tuple[DecodeRequest, list[torch.Tensor]]]) -> AsyncIterator[list[Any]]:
        queue: asyncio.Queue = asyncio.Queue()
        self.waiting.append((items, queue))
        if self.driver is None or self.driver.done():
            self.driver = asyncio.create_task(self._drive())
        while True:
            step = await queue.get()
            if step is None:
                return
            if isinstance(step, BaseException):
                raise step
            yield step

    async def _drive(self) -> None:
        """Continuous batching: between decode steps, waiting calls are prefilled and join the
        running batch (up to ``max_batch_size`` rows); finished rows leave it at once."""
        loop = asyncio.get_running_loop()
        batch = None
        groups: dict[int, dict[str, Any]] = {}
        next_id = 0

        def fail(ids: list[int], error: Exception) -> None:
            for gid in ids:
                groups.pop(gid)["queue"].put_nowait(error)

        while self.waiting or (batch is not None and batch.rows):
            room = self.max_rows - (len(batch.rows) if batch is not None else 0)
            admitted, reqs, feats, tags = [], [], [], []
            if self.waiting and room > 0:
                # A group joins only whole and only where it fits: the batch never exceeds max_rows.
                # Groups are at most max_rows (serve.batch's bound), so the head always fits an
                # empty batch and waits at most until enough rows finish.
                empty = batch is None or not batch.rows
                while self.waiting and (len(self.waiting[0][0]) <= room - len(reqs) or (empty and not reqs)):
                    items, queue = self.waiting.pop(0)
                    gid, next_id = next_id, next_id + 1
                    groups[gid] = {"queue": queue, "n": len(items), "done": 0}
                    admitted.append(gid)
                    for k, (req, feat) in enumerate(items):
                        self.metrics.queue_wait.observe(time.monotonic() - req.received)
                        reqs.append(req)
                        feats.append(feat)
                        tags.append((gid, k))
            if reqs:
                try:
                    new = await loop.run_in_executor(self.pool, self.decoder.start, reqs, feats, tags)
                    batch = new if batch is None else await loop.run_in_executor(self.pool, self.decoder.join, batch, new)
                except Exception as e:  # noqa: BLE001 - reported to the admitted groups only
                    if not isinstance(e, ValueError):
                        self.health.reason = f"prefill failed: {type(e).__name__}: {e}"
                    fail(admitted, e)
                    continue
                self.counts["batches"] += 1
                self.counts["rows"] += len(reqs)
                self.counts["max_batch"] = max(self.counts["max_batch"], len(batch.rows))
            try:
                outs = await loop.run_in_executor(self.pool, self.decoder.step, batch)
            except Exception as e:
                self.health.reason = f"decoding failed: {type(e).__name__}: {e}"
                fail(list(groups), e)
                batch = None
                continue
            lists: dict[int, list[Any]] = {}
            self.metrics.batch_rows.observe(len(outs))
            for (gid, k), out in outs:
                self.counts["cancelled"] += out.finish_reason == "cancelled"
                if out.finish_reason == "cancelled":
                    self.metrics.cancelled.inc()
                self.counts["errors"] += out.finish_reason == "error"
                group = groups[gid]
                lists.setdefault(gid, [StopIteration] * group["n"])[k] = out
                group["done"] += out.finish_reason is not None
            for gid, entries in lists.items():
                groups[gid]["queue"].put_nowait(entries)
                if groups[gid]["done"] == groups[gid]["n"]:
                    groups.pop(gid)["queue"].put_nowait(None)

    def stats(self) -> dict[str, Any]:
        """This replica's counters (``max_batch``: the most rows that decoded together; ``cancelled``:
        rows that left early because their caller went away)."""
        return dict(self.counts, replica=_replica_id())

    def check_health(self) -> None:
        self.health.check()


class ObserveRequests:
    """ASGI middleware: each HTTP request's route (the matched path template, ``unmatched`` for
    none), method, status code and end-to-end time (to the response's last byte, so a stream counts
    until it ends) go to the Gateway's metrics (``app.state.metrics``)."""

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

        try:
            await self.app(scope, receive, observed_send)
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

_REPLICA_GONE = ("ActorDiedError", "RayActorError", "ActorUnavailableError", "DeploymentUnavailableError")


@serve.deployment(name="Gateway", max_ongoing_requests=128, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class Gateway:
    """The OpenAI-compatible HTTP API: auth, limits, request validation, prompt building, SSE."""

    def __init__(self, encoder: DeploymentHandle, llm: DeploymentHandle, args: ServeConfig):
        import httpx

        from llava_platform.model.builder import load_processor

        use_tracking_uri(args.tracking_uri)
        processor, config = load_processor(ModelSpec(checkpoint=args.model), args.storage)
        self.encoder, self.llm = encoder, llm
        self.model_name = args.model_name
        self.limits = inputs.Limits.from_config(args)
        self.spec = ImageSpec.from_model(config, processor, args.image_aspect_ratio, Decoding.from_config(args))
        self.prompts = inputs.prompt_builder(processor, config, self.spec, self.limits)
        self.max_body = args.max_body_bytes
        self.replica_wait = args.replica_wait_timeout_s
        self.chat_page = args.chat_page
        self._api_key = api_key(args)
        self.http = httpx.AsyncClient(timeout=10.0)
        self.created = int(time.time())
        self.metrics = api.state.metrics = GatewayMetrics(args.model_name)

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
                gone = type(e).__name__ in _REPLICA_GONE or any(n in repr(e) for n in _REPLICA_GONE)
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
        images = await inputs.load_images(chat, self.spec, self.limits, self.http)
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
