"""Helpers of the Serve tests that read replicas' state through their handles and actors."""

from __future__ import annotations

import asyncio

import ray

from llava_platform.inference.requests import DecodeRequest


def batch_rows(serve_app, tiny_model_dir, calls: int, max_tokens: int) -> list[int]:
    """The largest decode batch each of ``calls`` concurrent LanguageModel calls decoded in."""
    from llava_platform.config.schema import ModelSpec
    from llava_platform.model.builder import load_processor

    processor, _ = load_processor(ModelSpec(checkpoint=str(tiny_model_dir)))
    ids = processor.tokenizer("USER: hello ASSISTANT:")["input_ids"]
    llm = serve_app.handle("LanguageModel")

    async def one(i):
        rows = 0
        async for out in llm.generate.options(stream=True).remote(DecodeRequest(ids + [i + 5], max_tokens)):
            rows = max(rows, out.batch_rows)
        return rows

    async def many():
        return await asyncio.gather(*(one(i) for i in range(calls)))

    return asyncio.run(many())

def replica_stats(serve_app, deployment: str = "VisionEncoder") -> dict[str, dict]:
    """Counters of every replica of a deployment (calls spread over replicas; poll until both seen)."""
    handle, seen = serve_app.handle(deployment), {}
    for _ in range(60):
        s = handle.stats.remote().result()
        seen[s["replica"]] = s
        if len(seen) == 2:
            break
    return seen

def replicas(deployment: str, app: str = "llava") -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and f"::{app}#{deployment}#" in a["name"]}
