"""The ``VisionEncoder`` deployment: prepared images -> projected image embeddings, batched, with a
cache by image content."""

import asyncio
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from ray import serve

from llava_platform.config.schema import ServeConfig
from llava_platform.data.images import Decoding, ImageSpec
from llava_platform.inference.engine import ImageEncoderCore, drop_modules
from llava_platform.serve.metrics import EncoderMetrics
from llava_platform.serve.replica import Unhealthy, load_model, replica_id


# Defaults fit the embedded default on a 2-CPU machine (Gateway 0.25 + VisionEncoder 0.5 + LanguageModel
# 1 CPU); the Serve config YAML overrides them per deployment.
@serve.deployment(name="VisionEncoder", max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.5})
class VisionEncoder:
    """Images -> projected image embeddings. Concurrent calls are batched; an LRU cache keyed by the
    image's content hash (and a table of encodes in flight) means a repeated image skips the tower."""

    def __init__(self, args: ServeConfig):
        model, processor = load_model(args)
        spec = ImageSpec.from_model(model.config, processor, args.image_aspect_ratio, Decoding.from_config(args))
        self.core = ImageEncoderCore(drop_modules(model, "vision"), spec)
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cache_size = args.encoder_cache_size
        self.inflight: dict[str, asyncio.Future] = {}
        self.counts = {"requests": 0, "encoded": 0, "cache_hits": 0, "batches": 0}
        self.metrics = EncoderMetrics(args.model_name)
        self.cache_bytes = 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
        self.health = Unhealthy()
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
        return dict(self.counts, cached=len(self.cache), replica=replica_id())

    def check_health(self) -> None:
        self.health.check()
