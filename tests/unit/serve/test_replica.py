"""Replica loss: a killed replica is replaced and requests keep succeeding (run after the other Serve
app tests: it disturbs the app), and lost replicas are told apart from failed requests by type."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
from inference_helpers import png, user_image_message
from replica_helpers import replicas

pytestmark = pytest.mark.ray


def test_killed_replicas_are_replaced_and_requests_keep_succeeding(serve_app, client):
    from ray import serve

    llm_before, enc_before = replicas("LanguageModel"), replicas("VisionEncoder")
    assert len(llm_before) == 2 and len(enc_before) == 2
    victim_llm, victim_enc = sorted(llm_before)[0], sorted(enc_before)[0]
    ray.kill(ray.get_actor(victim_llm, namespace="serve"), no_restart=True)
    ray.kill(ray.get_actor(victim_enc, namespace="serve"), no_restart=True)

    def ask(i):  # greedy: at the default temperature 1.0 the tiny model may sample EOS early
        messages = [user_image_message(png("red", (20 + i, 30)), "colour?")]
        return client.chat.completions.create(model="llava", messages=messages, max_tokens=4,
                                              temperature=0).usage.completion_tokens

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, range(16))) == [4] * 16

    deadline = time.time() + 90
    while time.time() < deadline:
        llm_now, enc_now = replicas("LanguageModel"), replicas("VisionEncoder")
        status = serve.status().applications["llava"]
        if (len(llm_now) == 2 and len(enc_now) == 2 and victim_llm not in llm_now and victim_enc not in enc_now
                and status.status == "RUNNING"):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"replicas not replaced: {llm_now} {enc_now} {status}")
    assert ask(1) == 4


def test_lost_replicas_are_told_apart_from_failed_requests_by_type():
    from ray.exceptions import ActorDiedError, RayTaskError

    from llava_platform.serve.replica import Unhealthy, replica_gone

    died = ActorDiedError()
    assert replica_gone(died)
    assert replica_gone(RayTaskError("encode", "traceback", died))  # an argument's replica died
    try:
        try:
            raise died
        except ActorDiedError as e:
            raise RuntimeError("the call failed") from e
    except RuntimeError as chained:
        assert replica_gone(chained)
    assert not replica_gone(ValueError("ActorDiedError in a message is not a lost replica"))
    assert not replica_gone(RayTaskError("generate", "traceback", ValueError("bad prompt")))
    health = Unhealthy()
    health.check()
    health.reason = "decoding failed: boom"
    with pytest.raises(RuntimeError, match="decoding failed"):
        health.check()
