"""What travels between the Gateway and the decoding replica: one row's request and each step's
output. Plain dataclasses with no torch: the Gateway imports them and stays a small process (it
parses HTTP, decodes images and tokenizes, and loads no model)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DecodeRequest:
    """One row of a decode batch. ``temperature == 0`` is greedy. ``cancelled`` (set where the row
    decodes, when its caller has gone away) makes the row leave the batch at the next step."""

    input_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    cancelled: bool = False
    arrival: float | None = None  # time.time() when the request reached the Gateway (metrics)
    received: float = 0.0  # time.monotonic() when the decoding replica got it (metrics)


@dataclass
class StepOutput:
    """What one decode step produced for one row: new text (possibly empty while a multi-byte
    character or a possible stop string is held back), the running completion token count, and the
    finish reason (``stop``, ``length``, ``cancelled`` for a row whose caller went away, or
    ``error`` with ``error`` saying why, for a row that failed alone) on the row's last step."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None
    error: str | None = None
    # Rows in the decode batch this step belonged to (observability: proves requests batch together).
    batch_rows: int = 1
