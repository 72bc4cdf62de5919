"""Benchmark: the Ray Serve application against LLaVA's model_worker design, on the same model in one run.

    python bench/serve.py                          # small preset, 32 new tokens per request
    python bench/serve.py --preset tiny --requests-per-level 32

(a) Throughput (requests/s, completion tokens/s) at concurrency 1, 4 and 16 of the Serve app
    (Gateway -> VisionEncoder -> LanguageModel, batched) vs a model_worker-style server: one process,
    FastAPI + uvicorn, one HF ``generate`` per request in a thread under ``asyncio.Semaphore(5)``
    (LLaVA's ``--limit-model-concurrency`` default). Both are driven over HTTP by the same client with
    the same requests; every request carries an image never seen before, so the encoder cache never
    helps here. Greedy decoding with the same prompt construction: both return the same tokens.
(b) p50 latency at concurrency 1 of the Serve app vs a bare in-process ``model.generate`` call on
    the same prepared inputs.
(c) VisionEncoder calls for 100 requests over 10 distinct images (target: 10, the cache).
(d) Load: 500 requests at concurrency 32; status codes counted, lost requests (no response) counted.
(e) Memory: each replica's resident set now and at its peak (VmHWM) after (a)-(d); the Gateway, which
    parses HTTP, decodes images and tokenizes but loads no weights, against the LanguageModel replica.

Every side computes with the same torch thread count (all cores), so the figures compare serving
designs, not thread settings. Ray gets a logical CPU count larger than the cores so that replicas can
reserve whole CPUs; the cores are still shared by everything, as they are for the baseline.
"""

import argparse
import asyncio
import base64
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def _png(seed: int, side: int = 96) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


QUESTIONS = ["What colour is the shape?", "What shape is in the image?", "How many shapes are there?",
             "Where is the shape?", "Describe the image."]


def _body(seed: int, max_tokens: int, image_seed: int | None = None) -> dict:
    url = "data:image/png;base64," + base64.b64encode(_png(seed if image_seed is None else image_seed)).decode()
    return {"model": "llava", "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": QUESTIONS[seed % len(QUESTIONS)]}]}]}


async def _drive(url: str, bodies: list[dict], concurrency: int, timeout: float = 300) -> dict:
    """Send ``bodies`` with at most ``concurrency`` in flight; statuses, latencies, tokens, wall time."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    statuses: Counter = Counter()
    latencies: list[float] = []
    tokens = 0

    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def one(body: dict) -> None:
            nonlocal tokens
            async with sem:
                t0 = time.perf_counter()
                try:
                    r = await client.post(f"{url}/v1/chat/completions", json=body)
                except Exception as e:  # no response at all: a lost request
                    statuses[f"lost:{type(e).__name__}"] += 1
                    return
                latencies.append(time.perf_counter() - t0)
                statuses[r.status_code] += 1
                if r.status_code == 200:
                    tokens += r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        wall = time.perf_counter() - t0
    return {"statuses": statuses, "latencies": latencies, "tokens": tokens, "wall": wall, "n": len(bodies)}


# ---------------------------------------------------------------------------------------------
# The baseline: LLaVA's model_worker design (run as a separate process: --worker)
# ---------------------------------------------------------------------------------------------

def run_worker(model_dir: str, port: int, limit: int) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI, Request

    from llava_platform.data.images import ImageSpec, normalize
    from llava_platform.inference.engine import load_for_serving
    from llava_platform.serve.inputs import Limits, build_prompt, load_images, prompt_builder
    from llava_platform.serve.protocol import parse_request

    model, processor = load_for_serving(model_dir)
    spec = ImageSpec.from_model(model.config, processor)
    limits = Limits(max_images=1, max_new_tokens=4096)
    prompts = prompt_builder(processor, model.config, spec, limits)
    semaphore = asyncio.Semaphore(limit)
    app = FastAPI()

    def generate(ids: list[int], pixels, max_new: int) -> int:
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 pixel_values=pixels, max_new_tokens=max_new, do_sample=False)
        return out.shape[1] - len(ids)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        req = parse_request(await request.json())
        images = await load_images(req, spec, limits, None)
        prompt = build_prompt(prompts, req, images)
        pixels = normalize(images[0].pixels[None], spec.mean, spec.std)
        async with semaphore:
            n = await asyncio.to_thread(generate, prompt.input_ids, pixels, prompt.max_new_tokens)
        return {"usage": {"completion_tokens": n}}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def _wait_http(url: str, timeout: float = 120) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            httpx.post(f"{url}/v1/chat/completions", json=_body(0, 1), timeout=30)
            return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_memory(app: str = "llava") -> dict[str, tuple[float, float]]:
    """Per Serve deployment of ``app``: (resident MB, peak resident MB) of its replica process, found by
    the title Ray gives a replica's worker (``ray::ServeReplica:<app>:<deployment>``)."""
    import psutil

    out = {}
    for proc in psutil.process_iter(["cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        if f"ServeReplica:{app}:" not in title:
            continue
        name = title.split(f"ServeReplica:{app}:", 1)[1].split()[0]
        status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
        kb = {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith(("VmRSS", "VmHWM"))}
        out[name] = (kb["VmRSS"] / 1024, kb["VmHWM"] / 1024)
    return out


def _row(label: str, r: dict) -> str:
    p50 = statistics.median(r["latencies"]) * 1000 if r["latencies"] else float("nan")
    return f"{label:<38}{r['n'] / r['wall']:>9.2f}{r['tokens'] / r['wall']:>10.1f}{p50:>10.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="model preset (default small)")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per request (default 32)")
    parser.add_argument("--requests-per-level", type=int, default=48,
                        help="requests sent at each concurrency level (default 48)")
    parser.add_argument("--latency-samples", type=int, default=20, help="requests for the p50 figures (default 20)")
    parser.add_argument("--load-requests", type=int, default=500, help="requests in the load test (default 500)")
    parser.add_argument("--load-concurrency", type=int, default=32, help="concurrency of the load test (default 32)")
    parser.add_argument("--llm-cpus", type=float, default=1,
                        help="CPUs the LanguageModel replica reserves; Ray sets its torch threads from it (default 1)")
    parser.add_argument("--batch-wait", type=float, default=0.0,
                        help="LanguageModel batch_wait_timeout_s (default 0, as serve_config.yaml)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    if args.worker:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        run_worker(args.model_dir, args.port, limit=5)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import numpy as np
    import ray
    import torch
    from ray import serve

    from llava_platform.data.images import normalize
    from llava_platform.model.builder import save_model
    from llava_platform.model.presets import build_preset
    from llava_platform.serve.app import LlavaAppArgs, build_app
    from llava_platform.data.images import ImageSpec
    from llava_platform.inference.engine import load_for_serving
    from llava_platform.serve.inputs import Limits, build_prompt, load_images, prompt_builder
    from llava_platform.serve.protocol import parse_request

    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    model, processor = build_preset(args.preset, seed=0)
    model_dir = save_model(model, processor, str(work / "model"))
    levels = (1, 4, 16)
    seed = iter(range(1, 10**6))  # a fresh image for every request of (a) and (b)
    results: dict = {}

    # --- (a) baseline worker -------------------------------------------------------------------
    port = _free_port()
    log = open(work / "worker.log", "wb")
    worker = subprocess.Popen([sys.executable, __file__, "--worker", "--model-dir", model_dir, "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    try:
        _wait_http(f"http://127.0.0.1:{port}")
        for c in levels:
            bodies = [_body(next(seed), args.max_tokens) for _ in range(args.requests_per_level)]
            asyncio.run(_drive(f"http://127.0.0.1:{port}", bodies[:c], c))  # warm
            results[("worker", c)] = asyncio.run(_drive(f"http://127.0.0.1:{port}", bodies, c))
    finally:
        worker.terminate()
        worker.wait(30)
        log.close()

    # --- Serve -----------------------------------------------------------------------------------
    ray.init(num_cpus=threads + 2, include_dashboard=False, _temp_dir=str(work / "ray"))
    http_port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port}, proxy_location="HeadOnly")
    app_args = LlavaAppArgs(model=model_dir, max_new_tokens_limit=max(args.max_tokens, 64), max_batch_size=16,
                            batch_wait_timeout_s=args.batch_wait)
    serve.run(build_app(app_args, {
        "Gateway": {"num_replicas": 1, "max_ongoing_requests": 256, "ray_actor_options": {"num_cpus": 0.5}},
        "VisionEncoder": {"num_replicas": 1, "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.5}},
        "LanguageModel": {"num_replicas": 1, "max_ongoing_requests": 64,
                          "ray_actor_options": {"num_cpus": args.llm_cpus}},
    }), name="llava", route_prefix="/")
    url = f"http://127.0.0.1:{http_port}"
    try:
        for c in levels:
            bodies = [_body(next(seed), args.max_tokens) for _ in range(args.requests_per_level)]
            asyncio.run(_drive(url, bodies[:c], c))  # warm
            results[("serve", c)] = asyncio.run(_drive(url, bodies, c))

        # --- (b) latency at concurrency 1 vs a bare generate on the same prepared inputs ---------
        serve_lat = asyncio.run(_drive(url, [_body(next(seed), args.max_tokens)
                                             for _ in range(args.latency_samples)], 1))
        bare_model, bare_proc = load_for_serving(model_dir)
        spec = ImageSpec.from_model(bare_model.config, bare_proc)
        limits = Limits(max_images=1, max_new_tokens=4096)
        builder = prompt_builder(bare_proc, bare_model.config, spec, limits)
        bare: dict[int, list[float]] = {}
        # Matched: the replica's torch threads (Ray sets them from its CPU reservation); and all cores.
        for n_threads in sorted({max(1, int(args.llm_cpus)), threads}):
            torch.set_num_threads(n_threads)
            times = []
            for _ in range(args.latency_samples + 2):
                req = parse_request(_body(next(seed), args.max_tokens))
                images = asyncio.run(load_images(req, spec, limits, None))
                prompt = build_prompt(builder, req, images)
                ids = torch.tensor([prompt.input_ids])
                pixels = normalize(np.stack([images[0].pixels]), spec.mean, spec.std)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    bare_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                        max_new_tokens=prompt.max_new_tokens, do_sample=False)
                times.append(time.perf_counter() - t0)
            bare[n_threads] = times[2:]

        # --- (c) encoder calls: 100 requests over 10 distinct images ------------------------------
        encoder = serve.get_deployment_handle("VisionEncoder", "llava")
        before = encoder.stats.remote().result()
        cache_bodies = [_body(i, 4, image_seed=10**7 + i % 10) for i in range(100)]
        cache_run = asyncio.run(_drive(url, cache_bodies, 8))
        after = encoder.stats.remote().result()
        encoded = after["encoded"] - before["encoded"]

        # --- (d) load ------------------------------------------------------------------------------
        load_bodies = [_body(i, 16, image_seed=2 * 10**7 + i % 50) for i in range(args.load_requests)]
        load = asyncio.run(_drive(url, load_bodies, args.load_concurrency))
        llm_stats = serve.get_deployment_handle("LanguageModel", "llava").stats.remote().result()
        memory = _replica_memory()
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\n{args.preset} preset, {args.max_tokens} new tokens per request, greedy, {threads} torch threads per "
          f"side, {args.requests_per_level} requests per level (each with a new image)")
    print(f"\n(a) throughput{'':<24}{'req/s':>9}{'tokens/s':>10}{'p50 ms':>10}")
    for c in levels:
        print(_row(f"model_worker design, concurrency {c}", results[("worker", c)]))
        print(_row(f"Ray Serve app, concurrency {c}", results[("serve", c)]))
    for c in levels:
        w, s = results[("worker", c)], results[("serve", c)]
        print(f"    ratio Serve / model_worker at concurrency {c:>2}: "
              f"{(s['n'] / s['wall']) / (w['n'] / w['wall']):.2f}x  (target >= 4x at 16)")
    bad: dict = {}
    for key, r in results.items():
        non200 = {k: v for k, v in r["statuses"].items() if k != 200}
        if non200:
            bad[key] = non200
    if bad:
        print(f"    non-200 responses during (a): {bad}")
    serve_p50 = statistics.median(serve_lat["latencies"])
    matched = max(1, int(args.llm_cpus))
    print(f"\n(b) p50 latency at concurrency 1: Serve app {serve_p50 * 1000:.0f} ms (HTTP, 3 deployments, "
          f"LanguageModel replica on {matched} torch thread(s))")
    for n_threads, times in bare.items():
        p50 = statistics.median(times)
        tag = " (matched)" if n_threads == matched else ""
        print(f"    bare generate, {n_threads} torch thread(s){tag}: {p50 * 1000:.0f} ms; ratio {serve_p50 / p50:.2f}x"
              f" (target <= 1.15x)")
    print(f"\n(c) vision encoder calls for 100 requests over 10 distinct images: {encoded} (target 10); "
          f"statuses {dict(cache_run['statuses'])}")
    lost = sum(v for k, v in load["statuses"].items() if str(k).startswith("lost"))
    five = sum(v for k, v in load["statuses"].items() if isinstance(k, int) and k >= 500)
    answered = sum(v for k, v in load["statuses"].items() if isinstance(k, int))
    print(f"\n(d) load: {args.load_requests} requests at concurrency {args.load_concurrency}: statuses "
          f"{dict(load['statuses'])}; 5xx {five}, lost {lost}, answered {answered}/{args.load_requests}; "
          f"{load['n'] / load['wall']:.1f} req/s, p50 {statistics.median(load['latencies']) * 1000:.0f} ms, "
          f"p99 {np.percentile(load['latencies'], 99) * 1000:.0f} ms")
    print(f"    LanguageModel replica: {llm_stats}")
    print("\n(e) replica memory after (a)-(d), resident / peak MB: " +
          ", ".join(f"{k} {rss:.0f} / {hwm:.0f}" for k, (rss, hwm) in sorted(memory.items())))
    if "Gateway" in memory and "LanguageModel" in memory:
        print(f"    ratio Gateway / LanguageModel peak: {memory['Gateway'][1] / memory['LanguageModel'][1]:.2f}x"
              " (the Gateway loads no weights)")


if __name__ == "__main__":
    main()
