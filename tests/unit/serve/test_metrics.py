"""The Serve app's Prometheus metrics, scraped over HTTP from Ray's metrics endpoint on 127.0.0.1
after known traffic, and the Grafana dashboard's queries checked against what is exported."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from inference_helpers import png, user_image_message

from llava_platform.inference.requests import DecodeRequest
from llava_platform.serve.metrics import exported_names

DASHBOARD = Path(__file__).resolve().parents[3] / "infra" / "grafana" / "llava-serve.json"
IGNORED = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "replica", "otel_scope_name",
           "otel_scope_schema_url", "otel_scope_version"}


ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts" / "metrics"


def scrape(url: str, app: str) -> tuple[dict[tuple, float], set[str]]:
    """Sample values summed over replicas and workers, keyed by (name, sorted labels), for ``app``;
    and every series name on the endpoint."""
    text = httpx.get(url, timeout=10).text
    values: dict[tuple, float] = defaultdict(float)
    names = set()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            names.add(s.name)
            if s.name.startswith("ray_llava_") and s.labels.get("application") == app:
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k not in IGNORED))
                values[(s.name, labels)] += s.value
    return dict(values), names


def total(values: dict[tuple, float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in values.items() if n == name and all((k, w) in ls for k, w in labels.items()))


def settled(url: str, app: str, interval: float = 4.5, timeout: float = 60) -> tuple[dict, set]:
    """A scrape that no longer changes over two report intervals (earlier traffic all reported)."""
    deadline = time.time() + timeout
    prev = scrape(url, app)
    while time.time() < deadline:
        time.sleep(interval)
        cur = scrape(url, app)
        if cur[0] == prev[0]:
            return cur
        prev = cur
    return prev


@pytest.mark.ray
def test_scraped_metrics_match_the_traffic_sent(serve_app, ray_cluster, tiny_model_dir):
    from llava_platform.config.schema import ModelSpec
    from llava_platform.data.images import num_image_tokens
    from llava_platform.model.builder import load_processor

    url, app = ray_cluster.metrics_url, serve_app.name
    before, _ = settled(url, app)
    images = [png(c, (44, 28)) for c in ("olive", "navy")]  # not used by other tests
    answers = []
    for raw in (images[0], images[1], images[0]):
        r = httpx.post(f"{serve_app.url}/v1/chat/completions", timeout=60, json={
            "model": "llava", "messages": [user_image_message(raw, "what colour?")], "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200, r.text
        answers.append((r.json()["usage"], r.json()["choices"][0]["finish_reason"]))
    with httpx.stream("POST", f"{serve_app.url}/v1/chat/completions", timeout=60, json={
            "model": "llava", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    finish = [c["finish_reason"] for e in events for c in e.get("choices", []) if c.get("finish_reason")]
    answers.append((events[-1]["usage"], finish[0]))
    assert httpx.post(f"{serve_app.url}/v1/chat/completions", content=b"{nope", timeout=30).status_code == 400
    assert httpx.post(f"{serve_app.url}/v1/chat/completions", timeout=30, json={
        "model": "other", "messages": [{"role": "user", "content": "hi"}]}).status_code == 404

    # A stream whose caller goes away after two tokens: its row is cancelled.
    processor, config = load_processor(ModelSpec(checkpoint=str(tiny_model_dir)))
    ids = processor.tokenizer("USER: tell me a long story ASSISTANT:")["input_ids"]

    async def start_and_cancel():
        stream = serve_app.handle("LanguageModel").generate.options(stream=True).remote(DecodeRequest(ids, 1500))
        async for out in stream:
            if out.completion_tokens >= 2:
                break
        stream.cancel()

    asyncio.run(start_and_cancel())

    deadline = time.time() + 60
    while time.time() < deadline:
        after, names = scrape(url, app)
        if (total(after, "ray_llava_request_finished_total") - total(before, "ray_llava_request_finished_total") >= 5
                and total(after, "ray_llava_http_requests_total") - total(before, "ray_llava_http_requests_total") >= 6):
            break
        time.sleep(1)
    after, names = settled(url, app)
    # What an operator would see for this app, kept for reading (test-artifacts/ is not tracked).
    sample = [line for line in httpx.get(url, timeout=10).text.splitlines()
              if line.startswith("ray_llava_") and f'application="{app}"' in line]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "scrape.txt").write_text("\n".join(sample) + "\n")

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    route = "/v1/chat/completions"
    assert delta("ray_llava_http_requests_total", route=route, method="POST", status="200") == 4
    assert delta("ray_llava_http_requests_total", route=route, status="400") == 1
    assert delta("ray_llava_http_requests_total", route=route, status="404") == 1
    assert delta("ray_llava_http_requests_total") == 6
    assert delta("ray_llava_request_errors_total", code="invalid_json") == 1
    assert delta("ray_llava_request_errors_total", code="model_not_found") == 1
    assert delta("ray_llava_request_errors_total") == 2
    assert delta("ray_llava_e2e_request_latency_seconds_count", route=route) == 6
    assert delta("ray_llava_e2e_request_latency_seconds_sum", route=route) > 0

    reasons = defaultdict(int)
    for _, reason in answers:
        reasons[reason] += 1
    for reason, n in reasons.items():
        assert delta("ray_llava_request_finished_total", finish_reason=reason) == n, reason
    assert delta("ray_llava_request_finished_total", finish_reason="cancelled") == 1
    assert delta("ray_llava_request_finished_total") == 5
    assert delta("ray_llava_cancelled_rows_total") == 1
    prompt = sum(u["prompt_tokens"] for u, _ in answers) + len(ids)
    assert delta("ray_llava_prompt_tokens_total") == prompt
    completion = sum(u["completion_tokens"] for u, _ in answers)
    assert completion + 2 <= delta("ray_llava_generation_tokens_total") <= completion + 1500
    with_tokens = sum(1 for u, _ in answers if u["completion_tokens"] >= 1) + 1
    with_two = sum(1 for u, _ in answers if u["completion_tokens"] >= 2) + 1
    assert delta("ray_llava_time_to_first_token_seconds_count") == with_tokens
    assert delta("ray_llava_time_per_output_token_seconds_count") == with_two
    assert delta("ray_llava_queue_wait_seconds_count") == 5
    steps = delta("ray_llava_decode_batch_rows_count")
    assert steps >= completion  # one observation per decode step

    hits, misses = delta("ray_llava_encoder_cache_hits_total"), delta("ray_llava_encoder_cache_misses_total")
    assert hits + misses == 3 and 2 <= misses <= 3  # the repeat is a hit where it met the same replica
    assert delta("ray_llava_images_encoded_total") == misses
    assert 1 <= delta("ray_llava_encode_latency_seconds_count") <= misses
    entries, size = total(after, "ray_llava_encoder_cache_entries"), total(after, "ray_llava_encoder_cache_bytes")
    per_image = num_image_tokens(config) * config.text_config.hidden_size * 4  # float32 embeddings
    assert entries >= 2 and size == entries * per_image

    assert exported_names() <= names, sorted(exported_names() - names)
    missing = dashboard_metrics() - names
    assert not missing, f"the dashboard queries metrics the app does not export: {sorted(missing)}"


def dashboard_metrics() -> set[str]:
    """Every metric name in the dashboard's PromQL queries."""
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    found = set()
    for expr in exprs:
        found |= set(re.findall(r"\bray_[a-z_]+\b", expr))
    return found


def test_the_dashboard_is_importable_and_charts_what_the_issue_asks():
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    assert {"${datasource}"} == {p["datasource"]["uid"] for p in board["panels"] if "datasource" in p}
    assert [v["name"] for v in board["templating"]["list"]][:1] == ["datasource"]
    titles = " | ".join(p["title"].lower() for p in board["panels"])
    for wanted in ("request rate", "error rate", "time to first token", "time per output token", "tokens/s",
                   "batch", "cache hit rate", "replicas"):
        assert wanted in titles, wanted
    names = dashboard_metrics()
    assert names and all(n in exported_names() or n.startswith("ray_serve_") for n in names), names
