"""The single-process reference for preprocessing (LLaVA's ``LazySupervisedDataset`` style): every
record read, tokenized and its image prepared in one process, no Ray. ``bench/preprocess.py`` times the
Ray Data pipeline against it, and a test checks the two write the same bytes (both run
:class:`~llava_platform.data.pipeline.RecordProcessor`).
"""

from __future__ import annotations

import io
import time

import pyarrow as pa
import pyarrow.parquet as pq

from llava_platform import storage
from llava_platform.config.schema import PreprocessJobConfig
from llava_platform.data.pipeline import OUTPUT_SCHEMA, RecordProcessor
from llava_platform.data.source import array_records, jsonl_record
from llava_platform.locations import absolute_paths
from llava_platform.preprocess import sample_spec_for


def prepare_reference(cfg: PreprocessJobConfig, out_file: str) -> tuple[int, float]:
    """Process every record in one process, record by record, with no Ray, streaming the output
    rows (ok and rejected, in source order) to the Parquet file ``out_file``.

    Returns:
        (records processed, seconds).
    """
    t0 = time.time()
    tokenizer, spec = sample_spec_for(absolute_paths(cfg))
    raw = storage.read_bytes(cfg.data.data_path, cfg.storage)
    if raw.decode("utf-8").lstrip("\ufeff \t\r\n").startswith("["):
        rows = [{"row": i, "id": rid, "raw": text} for i, (rid, text) in enumerate(array_records(io.BytesIO(raw)))]
    else:
        rows, pos = [], 0
        for line in raw.splitlines(keepends=True):
            parsed = jsonl_record(line)
            if parsed is not None:
                rows.append({"row": pos, "id": parsed[0], "raw": parsed[1]})
            pos += len(line)
    first: dict[str, int] = {}
    for r in rows:
        if r["id"] is not None:
            first.setdefault(r["id"], r["row"])
    proc = RecordProcessor(tokenizer, spec, cfg.data.image_root, cfg.storage, duplicates=first,
                           fail_on_bad_record=cfg.data.on_bad_record == "fail", max_image_bytes=cfg.data.max_image_bytes)
    with pq.ParquetWriter(out_file, OUTPUT_SCHEMA) as writer:
        pending: list[pa.Table] = []
        for r in rows:
            pending.append(proc.process([r]))
            if len(pending) == 64:
                writer.write_table(pa.concat_tables(pending))
                pending = []
        if pending:
            writer.write_table(pa.concat_tables(pending))
    return len(rows), time.time() - t0
