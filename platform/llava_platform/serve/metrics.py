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

from dataclasses import dataclass
from typing import Any

PREFIX = "ray_"  # what Ray's exporter puts before every application metric

_LATENCY_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_PER_TOKEN_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Metric:
    """One metric's definition: made per replica by :meth:`make`, named on Ray's endpoint by
    :meth:`series`."""

    kind: str  # counter | histogram | gauge
    name: str
    description: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()

    def make(self, model: str) -> Any:
        from ray.serve import metrics

        extra = {"boundaries": list(self.boundaries)} if self.kind == "histogram" else {}
        metric = getattr(metrics, self.kind.capitalize())(self.name, description=self.description,
                                                          tag_keys=("model", *self.tags), **extra)
        metric.set_default_tags({"model": model})
        return metric

    def series(self) -> set[str]:
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}[self.kind]
        return {f"{PREFIX}{self.name}{s}" for s in suffixes}


class _Metrics:
    """A deployment's metrics: one attribute per entry of ``METRICS``, made for the served model."""

    METRICS: dict[str, Metric] = {}

    def __init__(self, model: str):
        for attr, metric in self.METRICS.items():
            setattr(self, attr, metric.make(model))


class GatewayMetrics(_Metrics):
    """HTTP requests by route, method and status code; API errors by error code; end-to-end latency
    (arrival to the last byte of the response, streamed or not)."""

    METRICS = {
        "requests": Metric("counter", "llava_http_requests", "HTTP requests answered, by route, method and "
                           "status code", ("route", "method", "status")),
        "errors": Metric("counter", "llava_request_errors", "API errors returned, by error code (also those sent "
                         "inside a stream after its 200)", ("code",)),
        "latency": Metric("histogram", "llava_e2e_request_latency_seconds", "Seconds from a request's arrival to "
                          "the last byte of its response", ("route",), _LATENCY_S),
    }

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"route": route, "method": method, "status": str(status)})
        self.latency.observe(seconds, tags={"route": route})

    def error(self, code: str | None) -> None:
        self.errors.inc(tags={"code": code or "unknown"})


class LanguageModelMetrics(_Metrics):
    """Per request: time to first token (from the request's arrival at the Gateway), time per output
    token after the first, prompt and generated tokens, finish reasons, time queued before joining
    the decode batch; per decode step: rows in the batch; rows cancelled because their caller left."""

    METRICS = {
        "ttft": Metric("histogram", "llava_time_to_first_token_seconds", "Seconds from a request's arrival at the "
                       "Gateway to its first generated token", (), _LATENCY_S),
        "tpot": Metric("histogram", "llava_time_per_output_token_seconds", "Mean seconds per generated token "
                       "after the first, per request", (), _PER_TOKEN_S),
        "prompt_tokens": Metric("counter", "llava_prompt_tokens", "Prompt tokens prefilled (image tokens included)"),
        "generation_tokens": Metric("counter", "llava_generation_tokens", "Completion tokens generated"),
        "finished": Metric("counter", "llava_request_finished", "Requests finished, by finish reason "
                           "(stop, length, cancelled, error)", ("finish_reason",)),
        "queue_wait": Metric("histogram", "llava_queue_wait_seconds", "Seconds a request waited on the replica "
                             "before it was prefilled into the decode batch", (), _LATENCY_S),
        "batch_rows": Metric("histogram", "llava_decode_batch_rows", "Rows decoding together, observed at each "
                             "decode step", (), _ROWS),
        "cancelled": Metric("counter", "llava_cancelled_rows", "Rows that left the decode batch early because "
                            "their caller went away"),
    }

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


class EncoderMetrics(_Metrics):
    """Images encoded by the tower, cache hits (an in-flight encode of the same image counts as a hit)
    and misses, the cache's size in entries and bytes, and the tower's latency per encode batch."""

    METRICS = {
        "encoded": Metric("counter", "llava_images_encoded", "Images run through the vision tower"),
        "hits": Metric("counter", "llava_encoder_cache_hits", "Image encodes answered from the cache or from an "
                       "encode of the same image in flight"),
        "misses": Metric("counter", "llava_encoder_cache_misses", "Image encodes that had to run the tower"),
        "entries": Metric("gauge", "llava_encoder_cache_entries", "Images held in the encoder cache"),
        "bytes": Metric("gauge", "llava_encoder_cache_bytes", "Bytes of embeddings held in the encoder cache"),
        "latency": Metric("histogram", "llava_encode_latency_seconds", "Seconds the vision tower took per encode "
                          "batch", (), _LATENCY_S),
    }

    def cache_size(self, entries: int, size_bytes: int) -> None:
        self.entries.set(entries)
        self.bytes.set(size_bytes)


def exported_names() -> set[str]:
    """Every series name these metrics have on Ray's Prometheus endpoint (for dashboards and tests)."""
    return {series for cls in (GatewayMetrics, LanguageModelMetrics, EncoderMetrics)
            for metric in cls.METRICS.values() for series in metric.series()}
