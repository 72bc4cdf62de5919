"""Preprocessing on Ray Data: LLaVA records + images -> tokenized Parquet shards.

LLaVA's own code does this inside a torch ``Dataset`` on every training step, one image at a time.
Here it runs once, in parallel, and every record is accounted for:

    records in = written + rejected        (checked at the end of every run)

Output under ``output_path``::

    shards/status=ok/*.parquet          training rows (id, input_ids, labels, length, has_image, image)
    shards/status=rejected/*.parquet    the same rows for rejects, with reason and detail
    rejects.jsonl                       {"id", "row", "reason", "detail"} per rejected record
    manifest.json                       counts, rejects by reason, tokenizer fingerprint, template,
                                        image size, sources, the resolved config

Images are stored as uint8 HWC bytes at the vision tower's size; the training collate normalises them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.dataset as pads

from llava_platform import storage
from llava_platform.locations import absolute_paths
from llava_platform.config.schema import DataConfig, PreprocessJobConfig, StorageConfig
from llava_platform.data.conversation import chat_template, lone_surrogate, tokenize_record
from llava_platform.data.prepared import Manifest, PreprocessError, write_manifest
from llava_platform.data.sample import SampleSpec, encode_image
from llava_platform.data.source import TOO_DEEP
from llava_platform.errors import RecordError

log = logging.getLogger(__name__)

OUTPUT_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("id", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("length", pa.int32()),
        ("has_image", pa.bool_()),
        ("image", pa.binary()),
        # What record_policy: llava changed in a written record (conversation.NORMALISATIONS).
        ("normalised", pa.list_(pa.string())),
    ]
)





class RecordProcessor:
    """Turns source rows (``row``, ``id``, ``raw``) into output rows, one record at a time or in batches.

    The Ray Data stage and the single-process reference both call this, so a record becomes the same
    bytes either way. Images are fetched per batch (concurrently on S3 via ``fs.cat``).
    """

    def __init__(self, tokenizer: Any, spec: SampleSpec, image_root: str | None,
                 storage_config: StorageConfig | None = None, duplicates: dict[str, int] | None = None,
                 fail_on_bad_record: bool = False, max_image_bytes: int = DataConfig.model_fields["max_image_bytes"].default):
        self.tokenizer = tokenizer
        self.spec = spec
        self.image_root = image_root
        self.storage_config = storage_config
        self.duplicates = duplicates or {}
        self.fail = fail_on_bad_record
        self.max_image_bytes = max_image_bytes

    def _image_uri(self, name: str) -> str:
        """Where a record's image is: inside ``image_root`` (nothing outside it is ever read);
        with no root, the path as given.

        Raises:
            RecordError: ``image_outside_root``.
        """
        if self.image_root is None:
            return name
        uri = storage.inside(self.image_root, name)
        if uri is None:
            raise RecordError("image_outside_root", f"the image path {name!r} leads outside image_root "
                              f"{self.image_root} (absolute, another location, or through ..); it was not read")
        return uri

    def process(self, rows: Iterable[dict[str, Any]]) -> pa.Table:
        out: list[dict[str, Any]] = []
        pending: list[tuple[dict[str, Any], Any, str]] = []  # (out row, tokens, image uri)
        for src in rows:
            row = {"row": src["row"], "id": src["id"], "status": "ok", "reason": None, "detail": None,
                   "input_ids": None, "labels": None, "length": None, "has_image": False, "image": None,
                   "normalised": []}
            out.append(row)
            try:
                record = self._parse(src)
                tokens = tokenize_record(record, self.tokenizer, self.spec.template, self.spec.num_image_tokens,
                                         self.spec.max_length, self.spec.record_policy, row["normalised"])
            except RecordError as e:
                self._reject(row, e)
                continue
            row.update(input_ids=tokens.input_ids, labels=tokens.labels, length=tokens.length)
            if record.get("image"):
                try:
                    pending.append((row, record, self._image_uri(record["image"])))
                except RecordError as e:
                    self._reject(row, e)
        fetched = storage.read_many([uri for _, _, uri in pending], self.max_image_bytes, self.storage_config)
        for row, record, uri in pending:
            data = fetched[uri]
            try:
                if isinstance(data, FileNotFoundError):
                    raise RecordError("image_missing", f"{uri} does not exist")
                if isinstance(data, storage.FileTooLarge):
                    raise RecordError("image_file_too_large", f"{data} (data.max_image_bytes)")
                if isinstance(data, storage.NotARegularFile):
                    raise RecordError("image_not_a_file", str(data))
                if isinstance(data, Exception):
                    raise RecordError("image_unreadable", f"{uri}: {type(data).__name__}: {data}")
                row["image"] = encode_image(data, self.spec).tobytes()
                row["has_image"] = True
            except RecordError as e:
                self._reject(row, e)
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)

    def _parse(self, src: dict[str, Any]) -> dict[str, Any]:
        too_deep = RecordError("nested_too_deep", "the record nests arrays/objects too deeply to parse")
        if src["raw"] == TOO_DEEP:
            raise too_deep
        try:
            record = json.loads(src["raw"])
        except ValueError as e:
            raise RecordError("invalid_json", str(e)) from e
        except RecursionError:
            raise too_deep from None
        bad = lone_surrogate(record)
        if bad:
            raise RecordError("invalid_unicode", f"`{bad}` holds a lone UTF-16 surrogate; "
                              "text must be valid Unicode")
        if not isinstance(record, dict):
            raise RecordError("not_an_object", f"a record must be a JSON object, not {type(record).__name__}")
        if src["id"] is None:
            raise RecordError("missing_id", "the record has no string or integer `id`")
        first = self.duplicates.get(src["id"])
        if first is not None and first != src["row"]:
            raise RecordError("duplicate_id", f"id {src['id']!r} first appears at row {first}")
        image = record.get("image")
        if image is not None and not isinstance(image, str):
            raise RecordError("invalid_image_field", f"`image` must be a path string, not {type(image).__name__}")
        return record

    def _reject(self, row: dict[str, Any], err: RecordError) -> None:
        if self.fail:
            raise RecordError(err.reason, f"record {row['id']!r} (row {row['row']}): {err.detail}") from err
        row.update(status="rejected", reason=err.reason, detail=err.detail[:500], input_ids=None, labels=None,
                   length=None, has_image=False, image=None, normalised=[])


class _RayStage:
    """The Ray Data actor: one RecordProcessor per actor (tokenizer loaded once)."""

    def __init__(self, **kwargs: Any):
        self.processor = RecordProcessor(**kwargs)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.processor.process(batch.to_pylist())


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


@dataclass
class PrepareReport:
    output_path: str
    records_in: int
    written: int
    rejected: int
    rejects_by_reason: dict[str, int]
    seconds: float
    records_per_second: float
    phases: dict[str, float] = field(default_factory=dict)
    manifest: Manifest | None = field(repr=False, default=None)

    def table(self) -> str:
        lines = [
            "preprocessing summary",
            f"  {'records in':<28}{self.records_in:>10}",
            f"  {'written':<28}{self.written:>10}",
            f"  {'rejected':<28}{self.rejected:>10}",
        ]
        lines += [f"    {reason:<26}{n:>10}" for reason, n in sorted(self.rejects_by_reason.items())]
        lines += [f"  {'seconds':<28}{self.seconds:>10.1f}"]
        lines += [f"    {phase:<26}{sec:>10.1f}" for phase, sec in self.phases.items()]
        lines += [f"  {'records/s':<28}{self.records_per_second:>10.1f}", f"  output: {self.output_path}"]
        return "\n".join(lines)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the tokenizer's full definition (vocab, merges, special tokens)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def _prepare_output(cfg: PreprocessJobConfig) -> None:
    fs, path = storage.filesystem(cfg.output_path, cfg.storage)
    if fs.exists(path) and fs.ls(path):
        if not cfg.overwrite:
            raise PreprocessError(f"{cfg.output_path} already holds files; choose a new output_path or set overwrite: true")
        fs.rm(path, recursive=True)


def _duplicates(ds) -> tuple[int, dict[str, int]]:
    """Records in, and the first row of every id that occurs more than once.

    Only the ``id`` and ``row`` columns travel to the driver, where pyarrow aggregates them in C++
    (665K ids are ~15 MB); this measured cheaper than a Ray Data groupby, whose hash shuffle has a
    fixed cost of several seconds.
    """
    import pyarrow.compute as pc

    blocks = list(ds.select_columns(["row", "id"]).iter_batches(batch_format="pyarrow", batch_size=None))
    if not blocks:
        return 0, {}
    ids = pa.concat_tables(blocks)
    # One thread: Acero's pool raised "thread index 11 is out of range [0, 11)" in a CI run (pyarrow
    # 25.0.1, called from the driver beside Ray's threads); a count and a min need no parallelism.
    stats = (ids.filter(pc.is_valid(ids.column("id"))).group_by("id", use_threads=False)
             .aggregate([("row", "count"), ("row", "min")]))
    dups = stats.filter(pc.greater(stats.column("row_count"), 1))
    return ids.num_rows, dict(zip(dups.column("id").to_pylist(), dups.column("row_min").to_pylist()))


def run_pipeline(cfg: PreprocessJobConfig, tokenizer: Any, spec: SampleSpec) -> PrepareReport:
    """Prepare ``cfg``'s records into samples for the model ``tokenizer`` and ``spec`` describe (Ray
    must be initialised; the job, with the model's processor loaded, is :func:`llava_platform.preprocess.prepare`).

    Raises:
        PreprocessError: a bad record under ``on_bad_record: fail``, an existing output, or an
            accounting mismatch (records lost).
    """
    import ray.data

    t0 = time.time()
    cfg = absolute_paths(cfg)
    phases: dict[str, float] = {}
    _prepare_output(cfg)
    phases["check output"] = time.time() - t0
    datasource = _source(cfg)
    records_in, dups = _duplicates(ray.data.read_datasource(datasource, num_cpus=cfg.read_cpus))
    phases["scan ids"] = time.time() - t0 - sum(phases.values())
    arrow_fs, out_path = storage.arrow_filesystem(cfg.output_path, cfg.storage)
    shards_path = f"{out_path}/shards"
    stage_kwargs = dict(tokenizer=tokenizer, spec=spec, image_root=cfg.data.image_root,
                        storage_config=cfg.storage, duplicates=dups,
                        fail_on_bad_record=cfg.data.on_bad_record == "fail",
                        max_image_bytes=cfg.data.max_image_bytes)
    # Leave room for one read and one write task beside the actors, or reads never get scheduled.
    spare = ray.cluster_resources().get("CPU", 1) - 2 * cfg.read_cpus
    concurrency = cfg.num_workers or max(1, int(spare // cfg.cpus_per_worker))
    # An actor task processes one input block; blocks of a few batches keep every actor busy to
    # the end instead of one actor finishing a large block alone.
    num_blocks = max(1, -(-records_in // (cfg.batch_size * 4)))
    source = ray.data.read_datasource(datasource, num_cpus=cfg.read_cpus, override_num_blocks=num_blocks)
    prepared = source.map_batches(
        _RayStage,
        fn_constructor_kwargs=stage_kwargs,
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=cfg.cpus_per_worker,
    )
    try:
        prepared.write_parquet(shards_path, filesystem=arrow_fs, partition_cols=["status"],
                               min_rows_per_file=_rows_per_shard(cfg, spec), ray_remote_args={"num_cpus": cfg.read_cpus})
    except Exception as e:  # Ray wraps the worker's exception; surface the record's reason
        cause = _find_record_error(e)
        if cause is not None:
            raise PreprocessError(f"stopped at a bad record (on_bad_record: fail): {cause}") from e
        raise
    phases["process + write"] = time.time() - t0 - sum(phases.values())
    written, normalised = _count_written(arrow_fs, f"{shards_path}/status=ok")
    rejects = _read_rejects(arrow_fs, f"{shards_path}/status=rejected")
    by_reason = dict(Counter(r["reason"] for r in rejects))
    if records_in != written + len(rejects):
        raise PreprocessError(
            f"records were lost: {records_in} in, {written} written, {len(rejects)} rejected"
        )
    storage.write_bytes(storage.join(cfg.output_path, "rejects.jsonl"),
                        "".join(json.dumps(r) + "\n" for r in rejects).encode(), cfg.storage)
    phases["finalize"] = time.time() - t0 - sum(phases.values())
    seconds = time.time() - t0
    manifest = Manifest(
        stage=cfg.stage, records_in=records_in, written=written, rejected=len(rejects), rejects_by_reason=by_reason,
        normalised_by_kind=normalised, template=spec.template,
        template_sha256=hashlib.sha256(chat_template(spec.template).encode()).hexdigest(),
        tokenizer_sha256=tokenizer_fingerprint(tokenizer), sample_spec=spec,
        image_layout={"dtype": "uint8", "shape": [spec.image_size, spec.image_size, 3], "order": "HWC"},
        sources={"data_path": cfg.data.data_path, "image_root": cfg.data.image_root},
        config=json.loads(cfg.model_dump_json()), created_unix=int(time.time()), seconds=round(seconds, 2))
    write_manifest(cfg.output_path, manifest, cfg.storage)
    return PrepareReport(cfg.output_path, records_in, written, len(rejects), by_reason, seconds,
                         records_in / seconds if seconds else 0.0, phases, manifest)


def _rows_per_shard(cfg: PreprocessJobConfig, spec: SampleSpec) -> int:
    """Rows per Parquet file: ``rows_per_shard`` if set, else about ``shard_mb`` of images."""
    if cfg.rows_per_shard:
        return cfg.rows_per_shard
    return max(16, int(cfg.shard_mb * 2**20 // (spec.image_size**2 * 3)))


def _source(cfg: PreprocessJobConfig):
    from llava_platform.data.source import LlavaJsonDatasource

    try:
        return LlavaJsonDatasource(cfg.data.data_path, cfg.storage)
    except FileNotFoundError as e:
        raise PreprocessError(f"data_path {cfg.data.data_path} does not exist") from e
    except ValueError as e:
        raise PreprocessError(str(e)) from e


def _find_record_error(exc: BaseException) -> RecordError | None:
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen or e is None:
            continue
        seen.add(id(e))
        if isinstance(e, RecordError):
            return e
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    # Ray may hand back only the remote traceback as text; the outermost error is printed last.
    text = str(exc)
    marker = "RecordError: "
    if marker in text:
        reason, _, detail = text.rsplit(marker, 1)[1].splitlines()[0].partition(": ")
        return RecordError(reason, detail)
    return None


def _count_written(fs, path: str) -> tuple[int, dict[str, int]]:
    """Written rows, and how many of them record_policy: llava normalised, by kind."""
    info = fs.get_file_info(path)
    if info.type.name == "NotFound":
        return 0, {}
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["normalised"])
    kinds = Counter(k for fixes in table.column("normalised").to_pylist() for k in (fixes or []))
    return table.num_rows, dict(sorted(kinds.items()))


def _read_rejects(fs, path: str) -> list[dict[str, Any]]:
    info = fs.get_file_info(path)
    if info.type.name == "NotFound":
        return []
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["row", "id", "reason", "detail"])
    return sorted(table.to_pylist(), key=lambda r: r["row"])


# ---------------------------------------------------------------------------------------------
# The single-process reference (LLaVA's LazySupervisedDataset style): identical work, one record at a time
# ---------------------------------------------------------------------------------------------
