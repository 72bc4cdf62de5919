"""The Serve app's Prometheus metrics, one class per deployment, made with Ray Serve's metrics API.

Ray exports them on each node's metrics endpoint (``ray start --metrics-export-port``, scraped by
Prometheus through Ray's service discovery file) with the prefix ``ray_``; counters gain ``_total``
and histograms ``_bucket``/``_sum``/``_count``. Serve adds the tags ``application``, ``deployment``
and ``replica``; every metric here also carries ``model`` (the served model name). Names follow
vLLM's where one exists (time to first token, time per output token, end-to-end latency, prompt and
generation tokens), so dashboards written for OpenAI-style servers read them as they expect.

``infra/grafana/llava-serve.json`` charts them; a test checks that each of its queries names a metric
the running app exports.
"""

from __future__ import annotations

from typing import Any

PREFIX = "ray_"  # what Ray's exporter puts before every application metric

_LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
_PER_TOKEN_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
_ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def _counter(name: str, description: str, model: str, tags: tuple[str, ...] = ()) -> Any:
    from ray.serve.metrics import Counter

    metric = Counter(name, description=description, tag_keys=("model", *tags))
    metric.set_default_tags({"model": model})
    return metric


def _histogram(name: str, description: str, model: str, boundaries: list[float], tags: tuple[str, ...] = ()) -> Any:
    from ray.serve.metrics import Histogram

    metric = Histogram(name, description=description, boundaries=boundaries, tag_keys=("model", *tags))
    metric.set_default_tags({"model": model})
    return metric


def _gauge(name: str, description: str, model: str) -> Any:
    from ray.serve.metrics import Gauge

    metric = Gauge(name, description=description, tag_keys=("model",))
    metric.set_default_tags({"model": model})
    return metric


class GatewayMetrics:
    """HTTP requests by route, method and status code; API errors by error code; end-to-end latency
    (arrival to the last byte of the response, streamed or not)."""

    def __init__(self, model: str):
        self.requests = _counter("llava_http_requests", "HTTP requests answered, by route, method and status code",
                                 model, ("route", "method", "status"))
        self.errors = _counter("llava_request_errors", "API errors returned, by error code (also those sent "
                               "inside a stream after its 200)", model, ("code",))
        self.latency = _histogram("llava_e2e_request_latency_seconds", "Seconds from a request's arrival to the "
                                  "last byte of its response", model, _LATENCY_S, ("route",))

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"route": route, "method": method, "status": str(status)})
        self.latency.observe(seconds, tags={"route": route})

    def error(self, code: str | None) -> None:
        self.errors.inc(tags={"code": code or "unknown"})


class LanguageModelMetrics:
    """Per request: time to first token (from the request's arrival at the Gateway), time per output
    token after the first, prompt and generated tokens, finish reasons, time queued before joining
    the decode batch; per decode step: rows in the batch; rows cancelled because their caller left."""

    def __init__(self, model: str):
        self.ttft = _histogram("llava_time_to_first_token_seconds", "Seconds from a request's arrival at the "
                               "Gateway to its first generated token", model, _LATENCY_S)
        self.tpot = _histogram("llava_time_per_output_token_seconds", "Mean seconds per generated token after "
                               "the first, per request", model, _PER_TOKEN_S)
        self.prompt_tokens = _counter("llava_prompt_tokens", "Prompt tokens prefilled (image tokens included)", model)
        self.generation_tokens = _counter("llava_generation_tokens", "Completion tokens generated", model)
        self.finished = _counter("llava_request_finished", "Requests finished, by finish reason "
                                 "(stop, length, cancelled, error)", model, ("finish_reason",))
        self.queue_wait = _histogram("llava_queue_wait_seconds", "Seconds a request waited on the replica "
                                     "before it was prefilled into the decode batch", model, _LATENCY_S)
        self.batch_rows = _histogram("llava_decode_batch_rows", "Rows decoding together, observed at each "
                                     "decode step", model, _ROWS)
        self.cancelled = _counter("llava_cancelled_rows", "Rows that left the decode batch early because their "
                                  "caller went away", model)

    def finish(self, reason: str, prompt_tokens: int, completion_tokens: int, first_token_s: float | None,
               last_token_s: float | None) -> None:
        """One request's end; ``first_token_s``: seconds from arrival to its first token (None: it
        produced none), ``last_token_s``: to its last."""
        self.finished.inc(tags={"finish_reason": reason})
        self.prompt_tokens.inc(prompt_tokens)
        if completion_tokens:
            self.generation_tokens.inc(completion_tokens)
        if first_token_s is not None:
            self.ttft.observe(max(first_token_s, 0.0))
            if completion_tokens > 1 and last_token_s is not None:
                self.tpot.observe(max(last_token_s - first_token_s, 0.0) / (completion_tokens - 1))


class EncoderMetrics:
    """Images encoded by the tower, cache hits (an in-flight encode of the same image counts as a hit)
    and misses, the cache's size in entries and bytes, and the tower's latency per encode batch."""

    def __init__(self, model: str):
        self.encoded = _counter("llava_images_encoded", "Images run through the vision tower", model)
        self.hits = _counter("llava_encoder_cache_hits", "Image encodes answered from the cache or from an "
                             "encode of the same image in flight", model)
        self.misses = _counter("llava_encoder_cache_misses", "Image encodes that had to run the tower", model)
        self.entries = _gauge("llava_encoder_cache_entries", "Images held in the encoder cache", model)
        self.bytes = _gauge("llava_encoder_cache_bytes", "Bytes of embeddings held in the encoder cache", model)
        self.latency = _histogram("llava_encode_latency_seconds", "Seconds the vision tower took per encode "
                                  "batch", model, _LATENCY_S)

    def cache_size(self, entries: int, size_bytes: int) -> None:
        self.entries.set(entries)
        self.bytes.set(size_bytes)


def exported_names() -> set[str]:
    """Every series name these metrics have on Ray's Prometheus endpoint (for dashboards and tests)."""
    counters = ["llava_http_requests", "llava_request_errors", "llava_prompt_tokens", "llava_generation_tokens",
                "llava_request_finished", "llava_cancelled_rows", "llava_images_encoded", "llava_encoder_cache_hits",
                "llava_encoder_cache_misses"]
    histograms = ["llava_e2e_request_latency_seconds", "llava_time_to_first_token_seconds",
                  "llava_time_per_output_token_seconds", "llava_queue_wait_seconds", "llava_decode_batch_rows",
                  "llava_encode_latency_seconds"]
    gauges = ["llava_encoder_cache_entries", "llava_encoder_cache_bytes"]
    names = {f"{PREFIX}{c}_total" for c in counters} | {f"{PREFIX}{g}" for g in gauges}
    names |= {f"{PREFIX}{h}{s}" for h in histograms for s in ("_bucket", "_sum", "_count")}
    return names
