"""Length-grouped batching, as LLaVA's ``group_by_modality_length``, over a stream of rows.

LLaVA sorts a shuffled "megabatch" by length, separately for samples with and without an image, so
a batch holds one modality and similar lengths (less padding; no text-only sample beside 576 image
tokens). Ray Train streams shards, so the grouping here works on a bounded buffer of the stream:
memory stays ``batch_size * group_batches`` rows.
"""

from __future__ import annotations

import random
from typing import Any, Iterable, Iterator


def length_grouped_batches(rows: Iterable[dict[str, Any]], batch_size: int, group_batches: int = 8,
                           seed: int = 0, drop_last: bool = False) -> Iterator[list[dict[str, Any]]]:
    """Yield batches of rows grouped by modality (``has_image``) and sorted by ``length`` within a
    buffer of ``batch_size * group_batches`` rows; batch order within a buffer is shuffled.

    Every row is yielded exactly once (unless ``drop_last`` drops a final partial batch).
    """
    if batch_size < 1 or group_batches < 1:
        raise ValueError("batch_size and group_batches must be positive")
    rng = random.Random(seed)
    buffer: list[dict[str, Any]] = []
    leftovers: list[dict[str, Any]] = []
    for row in rows:
        buffer.append(row)
        if len(buffer) >= batch_size * group_batches:
            full, leftovers = _group(buffer, batch_size, rng)
            yield from full
            buffer = leftovers
    full, leftovers = _group(buffer, batch_size, rng)
    yield from full
    # Remainders of both modalities: still sorted by length, mixed only here at the very end.
    leftovers.sort(key=lambda r: r["length"])
    for i in range(0, len(leftovers), batch_size):
        batch = leftovers[i : i + batch_size]
        if len(batch) == batch_size or not drop_last:
            yield batch


def _group(buffer: list[dict[str, Any]], batch_size: int, rng: random.Random):
    batches, rest = [], []
    for modality in (True, False):
        rows = sorted((r for r in buffer if bool(r["has_image"]) == modality), key=lambda r: -int(r["length"]))
        cut = len(rows) - len(rows) % batch_size
        batches += [rows[i : i + batch_size] for i in range(0, cut, batch_size)]
        rest += rows[cut:]
    rng.shuffle(batches)
    return batches, rest
