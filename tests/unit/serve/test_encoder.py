"""The VisionEncoder deployment on the session's Serve app: a repeated image skips the tower."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from inference_helpers import png, user_image_message
from replica_helpers import replica_stats

pytestmark = pytest.mark.ray


def test_repeated_images_skip_the_encoder(serve_app, client):
    before = replica_stats(serve_app)
    images = [png(c, (50, 20)) for c in ("pink", "brown")]  # not used by other tests

    def ask(i):
        client.chat.completions.create(model="llava", messages=[user_image_message(images[i % 2], "colour?")],
                                       max_tokens=1)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(ask, range(20)))
    after = replica_stats(serve_app)
    encoded = sum(after[r]["encoded"] - before.get(r, {}).get("encoded", 0) for r in after)
    requests = sum(after[r]["requests"] - before.get(r, {}).get("requests", 0) for r in after)
    assert requests == 20
    assert 2 <= encoded <= 4  # each distinct image once per replica that saw it (two replicas)
