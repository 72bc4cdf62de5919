"""The LLaVA JSON/JSONL datasource's read tasks, run directly (no Ray runtime needed)."""

import json

import pyarrow as pa
import pytest

from llava_platform.data.source import LlavaJsonDatasource, detect_format


def rows_of(ds: LlavaJsonDatasource, parallelism: int):
    tasks = ds.get_read_tasks(parallelism)
    tables = [t for task in tasks for t in task()]
    return tasks, pa.concat_tables(tables).to_pylist() if tables else []


def records(n):
    return [{"id": f"r{i}", "conversations": [{"from": "human", "value": "q" * (i % 7)}, {"from": "gpt", "value": "a"}]}
            for i in range(n)]


def test_jsonl_ranges_cover_every_line_once(tmp_path):
    recs = records(57)
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs) + "\n\n")  # blank lines are skipped
    ds = LlavaJsonDatasource(str(p), bytes_per_task=300, block_rows=4)
    tasks, rows = rows_of(ds, parallelism=64)
    assert len(tasks) > 5
    assert [r["id"] for r in rows] == [r["id"] for r in recs]
    assert [json.loads(r["raw"]) for r in rows] == recs
    offsets = [r["row"] for r in rows]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)


def test_jsonl_bad_line_is_kept_for_rejection(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"id": "a", "conversations": []}\n{not json\n[1, 2]\n{"id": 7}\n{"id": true}\n')
    _, rows = rows_of(LlavaJsonDatasource(str(p)), 1)
    assert [r["id"] for r in rows] == ["a", None, None, "7", None]
    assert rows[1]["raw"] == "{not json"


def test_array_streams_in_blocks(tmp_path):
    recs = records(25)
    recs[3]["score"] = 0.5  # floats survive (ijson would give Decimal without use_float)
    p = tmp_path / "d.json"
    p.write_text(json.dumps(recs, indent=1))
    ds = LlavaJsonDatasource(str(p), block_rows=10)
    tasks = ds.get_read_tasks(8)
    assert len(tasks) == 1
    blocks = list(tasks[0]())
    assert [b.num_rows for b in blocks] == [10, 10, 5]
    rows = pa.concat_tables(blocks).to_pylist()
    assert [r["row"] for r in rows] == list(range(25))
    assert [json.loads(r["raw"]) for r in rows] == recs


def test_detect_format(tmp_path):
    (tmp_path / "a.json").write_text("\n  [ {} ]")
    (tmp_path / "b.jsonl").write_text('{"id": 1}\n')
    (tmp_path / "c.txt").write_text("hello")
    (tmp_path / "e.json").write_text("")
    assert detect_format(str(tmp_path / "a.json")) == "array"
    assert detect_format(str(tmp_path / "b.jsonl")) == "jsonl"
    for bad in ("c.txt", "e.json"):
        with pytest.raises(ValueError, match="neither a JSON array nor JSON lines"):
            detect_format(str(tmp_path / bad))


def test_lone_surrogate_escapes_are_found_across_chunk_boundaries():
    """ijson's C backend would turn a lone \\ud800 into "?": such files are parsed by its Python
    backend, so the scan must find every lone escape whatever the chunking, and never a pair."""
    import io
    import random

    from llava_platform.data.source import _LONE_SURROGATE_ESCAPE, array_records, has_lone_surrogate_escape

    rng = random.Random(0)
    parts = [rb"\ud83d\ude00", rb"\ud800", rb"\udc00", b"x", b"\\", b"u", b"ab"]
    for _ in range(2000):
        text = b"".join(rng.choice(parts) for _ in range(rng.randint(0, 12)))
        expected = bool(_LONE_SURROGATE_ESCAPE.search(text))
        for chunk in (1, 2, 3, 5, 7, 11, 13, 1000):
            assert has_lone_surrogate_escape(io.BytesIO(text), chunk) == expected, (text, chunk)
    got = list(array_records(io.BytesIO(rb'[{"id": "s", "t": "a\ud800"}, {"id": "e", "t": "\ud83d\ude00"}]')))
    assert got == [("s", '{"id": "s", "t": "a\\ud800"}'), ("e", '{"id": "e", "t": "\U0001f600"}')]
