"""Reading LLaVA record files (JSON array or JSONL, local or s3://) as a Ray Dataset, in parallel and
without the whole file in one worker's memory.

- JSONL is split into byte ranges, one read task each; a task owns the lines that *start* in its range.
- A JSON array (LCS-558K, LLaVA-Instruct-150K, mix665k ship as arrays) is streamed with ``ijson``
  by one task that yields blocks of records as it goes, so downstream stages start at once and run in
  parallel on those blocks, and no process ever holds the whole file.

Each row is ``{"row": position, "id": str | None, "raw": record JSON}``: the record stays JSON text so
that one malformed record (a number where a string belongs, say) cannot break the block's schema;
it is rejected later with its id and reason. ``row`` is the record's index (arrays) or byte offset
(JSONL): unique, and ordered like the file.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator

import pyarrow as pa
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from llava_platform import storage
from llava_platform.config.schema import StorageConfig

SOURCE_SCHEMA = pa.schema([("row", pa.int64()), ("id", pa.string()), ("raw", pa.string())])

#: What ``raw`` holds for a JSON-array record too deeply nested to write back as text (it is
#: rejected downstream as ``nested_too_deep``, like the same record in a JSONL file).
TOO_DEEP = "[" * 2000 + "]" * 2000


def _record_id(obj: object) -> str | None:
    if isinstance(obj, dict):
        rid = obj.get("id")
        if isinstance(rid, (str, int)) and not isinstance(rid, bool):
            # A lone surrogate cannot be stored as UTF-8: escaped, so the reject still names it.
            return str(rid).encode("utf-8", "backslashreplace").decode("utf-8")
    return None


def jsonl_record(line: bytes) -> tuple[str | None, str] | None:
    """``(id, text)`` of one JSONL line, ``None`` for a blank line. A line that is not JSON (or
    nests too deeply to parse) keeps ``id`` None and its text, to be rejected downstream with a
    reason."""
    text = line.decode("utf-8", errors="replace").strip()
    if not text:
        return None
    try:
        return _record_id(json.loads(text)), text
    except (ValueError, RecursionError):
        return None, text


def array_record(obj: object) -> tuple[str | None, str]:
    """``(id, text)`` of one record parsed from a JSON array: its JSON text (non-ASCII kept as is,
    or ``\\u`` escapes where it holds a lone surrogate, rejected downstream), or :data:`TOO_DEEP`."""
    try:
        text = json.dumps(obj, ensure_ascii=False)
        text.encode("utf-8")
    except RecursionError:
        return _record_id(obj), TOO_DEEP
    except UnicodeEncodeError:
        text = json.dumps(obj)
    return _record_id(obj), text


# A \\uD800-\\uDFFF escape that is not half of a pair (surrogate pairs are how ASCII-only JSON
# writes emoji, so those are common and fine).
_LONE_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
                                    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def has_lone_surrogate_escape(f: Any, chunk: int = 8 << 20) -> bool:
    """Whether the JSON text read from ``f`` escapes a lone UTF-16 surrogate. Streamed: a match
    counts only where the 6 bytes before it and the 12 from its start are in the buffer (or the
    file ends), and the bytes not yet decided are kept for the next chunk."""
    buf, lo, at_start = b"", 0, True
    while True:
        data = f.read(chunk)
        buf += data
        hi = len(buf) if not data else len(buf) - 11  # starts below hi have their 12 bytes
        for m in _LONE_SURROGATE_ESCAPE.finditer(buf):
            if lo <= m.start() < hi and (at_start or m.start() >= 6):
                return True
        if not data:
            return False
        cut = max(0, hi - 6)  # keep 6 bytes of context before the first undecided start
        at_start = at_start and cut == 0
        buf, lo = buf[cut:], max(lo, hi) - cut


def array_records(f: Any) -> Iterator[tuple[str | None, str]]:
    """The records of a JSON array file (seekable), streamed; nesting of any depth is parsed
    iteratively. ijson's C backend turns a lone surrogate escape into ``?``, which would change the
    text silently: a file that holds one is parsed by its Python backend, which keeps it (and the
    record is rejected as ``invalid_unicode``, as in a JSONL file)."""
    import ijson

    lone = has_lone_surrogate_escape(f)
    f.seek(0)
    backend = ijson.get_backend("python") if lone else ijson
    for obj in backend.items(f, "item", use_float=True):
        yield array_record(obj)


def _table(rows: list[tuple[int, str | None, str]]) -> pa.Table:
    rows_, ids, raws = zip(*rows) if rows else ((), (), ())
    return pa.table({"row": list(rows_), "id": list(ids), "raw": list(raws)}, schema=SOURCE_SCHEMA)


def detect_format(uri: str, config: StorageConfig | None = None) -> str:
    """``"array"`` when the first non-blank byte is ``[``, ``"jsonl"`` when it is ``{``.

    Raises:
        ValueError: the file is empty or starts with anything else.
    """
    fs, path = storage.filesystem(uri, config)
    with fs.open(path, "rb") as f:
        head = f.read(4096)
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if stripped[:1] == b"[":
        return "array"
    if stripped[:1] == b"{":
        return "jsonl"
    raise ValueError(f"{uri} is neither a JSON array nor JSON lines (starts with {stripped[:20]!r})")


def _read_array(uri: str, config: StorageConfig | None, block_rows: int) -> Iterator[pa.Table]:
    fs, path = storage.filesystem(uri, config)
    rows: list[tuple[int, str | None, str]] = []
    with fs.open(path, "rb") as f:
        for i, (rid, text) in enumerate(array_records(f)):
            rows.append((i, rid, text))
            if len(rows) >= block_rows:
                yield _table(rows)
                rows = []
    if rows:
        yield _table(rows)


def _read_jsonl_range(uri: str, config: StorageConfig | None, start: int, end: int, block_rows: int) -> Iterator[pa.Table]:
    fs, path = storage.filesystem(uri, config)
    rows: list[tuple[int, str | None, str]] = []
    with fs.open(path, "rb") as f:
        pos = start
        if start > 0:
            # The line running across `start` belongs to the previous range, unless `start` begins a line.
            f.seek(start - 1)
            prev = f.read(1)
            if prev != b"\n":
                pos = start + len(f.readline())
            else:
                f.seek(start)
        while pos < end:
            line = f.readline()
            if not line:
                break
            parsed = jsonl_record(line)
            if parsed is not None:
                rows.append((pos, *parsed))
            pos += len(line)
            if len(rows) >= block_rows:
                yield _table(rows)
                rows = []
    if rows:
        yield _table(rows)


class LlavaJsonDatasource(Datasource):
    """A Ray Data source for LLaVA record files (see the module docstring)."""

    # Small blocks (128 records) keep every preprocessing actor busy; records are ~1 KB of JSON,
    # so the per-block overhead stays small against the image work each record brings.
    def __init__(self, uri: str, config: StorageConfig | None = None, block_rows: int = 128,
                 bytes_per_task: int = 32 * 1024 * 1024):
        self.uri = uri
        self.config = config
        self.block_rows = block_rows
        self.bytes_per_task = bytes_per_task
        self.format = detect_format(uri, config)
        fs, path = storage.filesystem(uri, config)
        self.size = fs.size(path)

    def estimate_inmemory_data_size(self) -> int | None:
        return self.size

    def get_name(self) -> str:
        return f"LlavaJson({self.format})"

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, **_: object) -> list[ReadTask]:
        uri, config, block_rows = self.uri, self.config, self.block_rows
        if self.format == "array":
            meta = BlockMetadata(num_rows=None, size_bytes=self.size, input_files=[uri], exec_stats=None)
            return [ReadTask(lambda: _read_array(uri, config, block_rows), meta, schema=SOURCE_SCHEMA,
                             per_task_row_limit=per_task_row_limit)]
        n = max(1, min(parallelism, -(-self.size // self.bytes_per_task)))
        step = -(-self.size // n) if self.size else 1
        tasks = []
        for k in range(n):
            start, end = k * step, min(self.size, (k + 1) * step)
            meta = BlockMetadata(num_rows=None, size_bytes=end - start, input_files=[uri], exec_stats=None)
            tasks.append(ReadTask(lambda s=start, e=end: _read_jsonl_range(uri, config, s, e, block_rows), meta,
                                  schema=SOURCE_SCHEMA, per_task_row_limit=per_task_row_limit))
        return tasks
