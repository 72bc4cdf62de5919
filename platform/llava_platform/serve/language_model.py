"""The ``LanguageModel`` deployment: prompt ids + image embeddings -> text, streamed or whole, with
concurrent calls decoding together (:class:`~llava_platform.serve.batching.ContinuousBatcher`)."""

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, AsyncIterator

import torch
from ray import serve

from llava_platform.config.schema import ServeConfig
from llava_platform.inference.engine import Decoder, drop_modules
from llava_platform.inference.requests import DecodeRequest, StepOutput
from llava_platform.serve.batching import ContinuousBatcher, Item
from llava_platform.serve.metrics import LanguageModelMetrics
from llava_platform.serve.replica import Unhealthy, load_model, replica_id


# LanguageModel's max_ongoing_requests sits above the default max_batch_size (16) so that a full batch
# can form (Serve's own default of 5 capped it at 5 rows).
@serve.deployment(name="LanguageModel", max_ongoing_requests=32, ray_actor_options={"num_cpus": 1})
class LanguageModel:
    """Prompt ids + image embeddings -> text, streamed (``generate``) or whole (``complete``).

    Concurrent calls decode together. ``@serve.batch`` groups the calls that arrive within
    ``batch_wait_timeout_s``; each group is prefilled and joins the batch that is already decoding
    at the next step (continuous batching, up to ``max_batch_size`` rows), and a finished row leaves
    at once. So a request never waits for another request's whole answer.
    """

    def __init__(self, args: ServeConfig):
        model, processor = load_model(args)
        self.decoder = Decoder(drop_modules(model, "language"), processor.tokenizer)
        self.requests = 0
        self.metrics = LanguageModelMetrics(args.model_name)
        self.health = Unhealthy()
        self.batcher = ContinuousBatcher(self.decoder, args.max_batch_size,
                                         ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode"),
                                         self.metrics, self.health)
        self._decode_batch.set_max_batch_size(args.max_batch_size)
        self._decode_batch.set_batch_wait_timeout_s(args.batch_wait_timeout_s)

    async def generate(self, request: DecodeRequest, *features: torch.Tensor) -> AsyncIterator[StepOutput]:
        """Stream one request's output, piece by piece (call with ``.options(stream=True)``).

        Raises:
            ValueError: the prompt's image tokens do not match the embeddings given.
        """
        self.decoder.check(request, features)
        self.requests += 1
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

    # Ray forms the next group while earlier ones decode; the batcher merges them all into one batch.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, max_concurrent_batches=1024)
    async def _decode_batch(self, items: list[Item]) -> AsyncIterator[list[Any]]:
        queue = self.batcher.submit(items)
        while True:
            step = await queue.get()
            if step is None:
                return
            if isinstance(step, BaseException):
                raise step
            yield step

    def stats(self) -> dict[str, Any]:
        """This replica's counters (``max_batch``: the most rows that decoded together; ``cancelled``:
        rows that left early because their caller went away)."""
        return {"requests": self.requests, **asdict(self.batcher.counts), "replica": replica_id()}

    def check_health(self) -> None:
        self.health.check()
