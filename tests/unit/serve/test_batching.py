"""Continuous batching without Ray or Serve: groups join a running batch, each row's text is what it
would be alone, the batch never holds more than max_rows, and one group's failure stays in it."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from llava_platform.inference.engine import Decoder, drop_modules, load_for_serving
from llava_platform.inference.requests import DecodeRequest
from llava_platform.serve.batching import ContinuousBatcher


@pytest.fixture(scope="module")
def decoder(tiny_model_dir):
    model, processor = load_for_serving(str(tiny_model_dir))
    return Decoder(drop_modules(model, "language"), processor.tokenizer), processor.tokenizer


def _requests(tokenizer, n: int, first: int = 0) -> list[DecodeRequest]:
    ids = tokenizer("USER: hello ASSISTANT:")["input_ids"]
    return [DecodeRequest(ids + [5 + first + i], 3 + (first + i) % 4) for i in range(n)]


async def _collect(batcher: ContinuousBatcher, items) -> list[tuple[str, int, str | None]] | BaseException:
    queue = batcher.submit(items)
    texts, ends, rows = [""] * len(items), [None] * len(items), 0
    while True:
        step = await queue.get()
        if step is None:
            return [(t, r, e) for t, r, e in zip(texts, [rows] * len(items), ends)]
        if isinstance(step, BaseException):
            return step
        for k, out in enumerate(step):
            if out is not StopIteration:
                texts[k] += out.text
                ends[k] = out.finish_reason or ends[k]
                rows = max(rows, out.batch_rows)


def test_groups_share_a_bounded_batch_and_each_row_decodes_as_alone(decoder):
    dec, tokenizer = decoder
    groups = [_requests(tokenizer, n, first) for n, first in ((2, 0), (2, 2), (1, 4), (3, 5))]
    alone = [dec.generate([r], [[]])[0][0] for g in groups for r in g]

    async def run():
        batcher = ContinuousBatcher(dec, 3, ThreadPoolExecutor(1))
        results = await asyncio.gather(*(_collect(batcher, [(r, []) for r in g]) for g in groups))
        return batcher, results

    batcher, results = asyncio.run(run())
    assert [text for group in results for text, _, _ in group] == alone
    assert all(end in ("stop", "length") for group in results for _, _, end in group)
    assert batcher.counts.rows == 8 and 1 < batcher.counts.max_batch <= 3
    assert max(rows for group in results for _, rows, _ in group) <= 3
    with pytest.raises(ValueError, match="over max_rows 3"):
        batcher.submit([(r, []) for r in _requests(tokenizer, 4)])


def test_a_group_the_decoder_refuses_fails_alone(decoder):
    dec, tokenizer = decoder

    class Health:
        reason = None

    good = _requests(tokenizer, 2)
    bad = DecodeRequest(good[0].input_ids, 3)
    wrong = [torch.zeros(4, dec.model.config.text_config.hidden_size)]  # no <image> token for it

    async def run():
        batcher = ContinuousBatcher(dec, 4, ThreadPoolExecutor(1), health=Health())
        return batcher, await asyncio.gather(_collect(batcher, [(bad, wrong)]), _collect(batcher, [(r, []) for r in good]))

    batcher, (failed, ok) = asyncio.run(run())
    assert isinstance(failed, ValueError)
    assert [t for t, _, _ in ok] == [dec.generate([r], [[]])[0][0] for r in good]
    assert batcher.health.reason is None  # a refused request is not the replica's failure
