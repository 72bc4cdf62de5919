"""The Ray Data preprocessing job on the session's local Ray cluster.

One dataset holds good records and one record for every reject reason; every run must account for
every record (in = written + rejected), reject each bad one with its id and reason, and write the good
ones byte-identical to the single-process reference.
"""

import io
import json
import shutil

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from llava_platform import storage
from llava_platform.config import PreprocessJobConfig, load_config
from llava_platform.data.prepared import PreprocessError, open_prepared, read_manifest
from llava_platform.preprocess import prepare
from llava_platform.data.sample import LlavaCollator

pytestmark = pytest.mark.ray


def prepare_reference(cfg, out_file):
    """bench/reference.py's single-process path (the benchmark's baseline)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "bench" / "reference.py"
    spec = importlib.util.spec_from_file_location("bench_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.prepare_reference(cfg, out_file)


def h(v):
    return {"from": "human", "value": v}


def g(v):
    return {"from": "gpt", "value": v}


def build_dataset(root, synth_dir):
    """Records (good + one per reject reason) and their expected reasons, images in root/images."""
    images = root / "images"
    images.mkdir(parents=True)
    good_imgs = sorted((synth_dir / "images").iterdir())[:6]
    for p in good_imgs:
        shutil.copy(p, images / p.name)
    (images / "empty.png").write_bytes(b"")
    (images / "garbage.png").write_bytes(b"definitely not an image")
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(buf, format="PNG")
    (images / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    Image.new("RGB", (300, 300), (9, 9, 9)).save(images / "huge.png")
    Image.new("RGBA", (40, 20), (255, 0, 0, 128)).save(images / "rgba_wide.png")
    # Hostile files: an image outside the root, a device behind a symlink, a big file, a thin image.
    shutil.copy(good_imgs[0], root / "outside.png")
    (images / "zero.png").symlink_to("/dev/zero")
    (images / "big.png").write_bytes(np.random.default_rng(0).bytes(150_000))  # over data.max_image_bytes
    Image.new("RGB", (1, 400), (9, 9, 9)).save(images / "thin.png")

    ok = lambda i, name, q="<image>\nWhat colour is the shape?", a="red": {  # noqa: E731
        "id": f"good-{i}", "image": name, "conversations": [h(q), g(a)]}
    recs = [ok(i, p.name) for i, p in enumerate(good_imgs)]
    recs.append(ok(6, "rgba_wide.png", q="Describe it.\n<image>", a="A red rectangle."))
    recs.append({"id": "good-text", "conversations": [h("How many sides has a hexagon?"), g("Six.")]})
    recs.append({"id": 42, "image": good_imgs[0].name, "conversations": [h("<image>\nq"), g("a"), h("more?"), g("b")]})
    expected = {
        "missing": "image_missing",
        "garbage": "undecodable_image",
        "truncated": "undecodable_image",
        "empty": "zero_size_image",
        "huge": "image_too_large",
        "noconv": "empty_conversation",
        "noanswer": "no_assistant_turn",
        # record_policy: llava (the default) keeps these three as LLaVA does, normalised and counted.
        "gptfirst": None, "noplaceholder": None, "twoplaceholders": None,
        "twoturnplaceholders": "multiple_image_placeholders",
        "placeholdernoimage": "placeholder_without_image",
        "nonstring": "non_string_text",
        "toolong": "too_long",
        "escape": "image_outside_root",
        "absolute": "image_outside_root",
        "passwd": "image_outside_root",
        "devzero": "image_not_a_file",
        "bigfile": "image_file_too_large",
        "thin": "image_aspect_ratio",
        "surrogate": "invalid_unicode",
        "bad\\ud800id": "invalid_unicode",  # the id itself, escaped so that the reject can name it
        "good-0": None,  # the duplicate below is rejected; the first occurrence is kept
    }
    first_img = good_imgs[0].name
    recs += [
        {"id": "missing", "image": "nope.png", "conversations": [h("<image>\nq"), g("a")]},
        {"id": "garbage", "image": "garbage.png", "conversations": [h("<image>\nq"), g("a")]},
        {"id": "truncated", "image": "truncated.png", "conversations": [h("<image>\nq"), g("a")]},
        {"id": "empty", "image": "empty.png", "conversations": [h("<image>\nq"), g("a")]},
        {"id": "huge", "image": "huge.png", "conversations": [h("<image>\nq"), g("a")]},
        {"id": "noconv", "image": first_img, "conversations": []},
        {"id": "noanswer", "conversations": [h("just a question")]},
        {"id": "gptfirst", "conversations": [g("hello"), h("hi"), g("hey")]},
        {"id": "noplaceholder", "image": first_img, "conversations": [h("q"), g("a")]},
        {"id": "twoplaceholders", "image": first_img, "conversations": [h("<image>\n<image> q"), g("a")]},
        {"id": "twoturnplaceholders", "image": first_img,
         "conversations": [h("<image>\nq"), g("a"), h("<image>\nmore"), g("b")]},
        {"id": "placeholdernoimage", "conversations": [h("<image>\nq"), g("a")]},
        {"id": "nonstring", "conversations": [h("q"), g(["not", "a", "string"])]},
        {"id": "toolong", "conversations": [h("word " * 400), g("a")]},
        {"id": "good-0", "image": first_img, "conversations": [h("<image>\nagain"), g("dup")]},
        {"id": "escape", "image": "../outside.png", "conversations": [h("<image>\nq"), g("a")]},
        {"id": "absolute", "image": str(root / "outside.png"), "conversations": [h("<image>\nq"), g("a")]},
        {"id": "passwd", "image": "../../../../../../../../etc/passwd", "conversations": [h("<image>\nq"), g("a")]},
        {"id": "devzero", "image": "zero.png", "conversations": [h("<image>\nq"), g("a")]},
        {"id": "bigfile", "image": "big.png", "conversations": [h("<image>\nq"), g("a")]},
        {"id": "thin", "image": "thin.png", "conversations": [h("<image>\nq"), g("a")]},
        {"id": "surrogate", "conversations": [h("a lone \ud800 surrogate"), g("a")]},
        {"id": "bad\ud800id", "conversations": [h("q"), g("a")]},
    ]
    return recs, expected


# A record nested 5000 levels deep (Python's json gives up at ~1000): written into the files as
# text, since json.dumps cannot write it either.
DEEP = '{"id": "deep", "conversations": [], "x": ' + "[" * 5000 + "]" * 5000 + "}"


def config(tmp_path, data_path, image_root, out, **extra):
    sets = [
        "stage=finetune",
        "model.preset=tiny",
        f"data.data_path={data_path}",
        f"data.image_root={image_root}",
        f"output_path={out}",
        "data.max_length=160",
        "data.max_image_pixels=40000",
        "data.max_image_bytes=100000",
        "num_workers=2",
        "cpus_per_worker=0.5",
        "batch_size=4",
        "rows_per_shard=4",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, PreprocessJobConfig, sets)


@pytest.fixture(scope="module")
def bad_world(tmp_path_factory, synth_dir):
    root = tmp_path_factory.mktemp("bad")
    recs, expected = build_dataset(root, synth_dir)
    (root / "data.json").write_text(json.dumps(recs, indent=1)[:-1] + ",\n" + DEEP + "\n]")
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + DEEP + "\n{broken json\n")
    return root, [*recs, DEEP], dict(expected, deep="nested_too_deep")


@pytest.fixture(scope="module")
def array_run(ray_cluster, bad_world, tmp_path_factory):
    root, recs, expected = bad_world
    out = tmp_path_factory.mktemp("out") / "prepared"
    cfg = config(root, root / "data.json", root / "images", out)
    return cfg, prepare(cfg)


def test_every_record_accounted_for_with_its_reason(array_run, bad_world):
    cfg, report = array_run
    root, recs, expected = bad_world
    assert report.records_in == len(recs) == report.written + report.rejected
    with open(storage.join(cfg.output_path, "rejects.jsonl")) as f:
        rejects = [json.loads(line) for line in f]
    by_id = {}
    for r in rejects:
        by_id.setdefault(r["id"], []).append(r["reason"])
    for rid, reason in expected.items():
        if reason is None:
            continue
        assert by_id.get(rid) == [reason], (rid, by_id.get(rid), [r for r in rejects if r["id"] == rid])
    assert by_id["good-0"] == ["duplicate_id"]  # the second good-0 only
    assert all(r["detail"] for r in rejects)
    # Measured before: ../outside.png and the absolute path were read and written as training rows,
    # and the first bytes of /etc/passwd were copied into rejects.jsonl; /dev/zero was read until
    # memory ran out; the lone surrogate and the deep record aborted the whole job.
    text = open(storage.join(cfg.output_path, "rejects.jsonl")).read()
    assert "root:" not in text and "x:0:0" not in text
    assert report.written == 12  # good-0..6, good-text, 42, and the three normalised records
    manifest = read_manifest(cfg.output_path)
    assert manifest.records_in == len(recs) and manifest.rejected == len(rejects)
    assert sum(manifest.rejects_by_reason.values()) == len(rejects)
    assert manifest.normalised_by_kind == {"dropped_leading_gpt_turn": 1, "image_placeholder_added": 1,
                                              "image_placeholders_collapsed": 1}
    assert manifest.template == "vicuna_v1" and len(manifest.tokenizer_sha256) == 64
    assert manifest.image_layout["shape"] == [32, 32, 3]
    assert manifest.config["data"]["data_path"] == cfg.data.data_path


def test_ray_output_is_byte_identical_to_the_reference(array_run, tmp_path):
    cfg, _ = array_run
    n, _ = prepare_reference(cfg, str(tmp_path / "ref.parquet"))
    ref = pads.dataset(str(tmp_path / "ref.parquet"), format="parquet").to_table()
    assert n == ref.num_rows
    ours = pads.dataset(storage.strip_scheme(cfg.output_path) + "/shards/status=ok", format="parquet").to_table()
    ref_ok = sorted((r for r in ref.to_pylist() if r["status"] == "ok"), key=lambda r: r["row"])
    ours_ok = sorted(ours.to_pylist(), key=lambda r: r["row"])
    assert len(ref_ok) == len(ours_ok) == 12
    for a, b in zip(ref_ok, ours_ok):
        for col in ("id", "input_ids", "labels", "length", "has_image", "image"):
            assert a[col] == b[col], (a["id"], col)
    ref_rej = sorted((r["id"], r["reason"]) for r in ref.to_pylist() if r["status"] == "rejected")
    assert ref_rej == sorted((r["id"], r["reason"]) for r in map(json.loads, open(storage.join(cfg.output_path, "rejects.jsonl"))))


def test_wide_rgba_image_is_padded_with_the_mean_colour(array_run):
    cfg, _ = array_run
    row = next(r for r in pads.dataset(storage.strip_scheme(cfg.output_path) + "/shards/status=ok", format="parquet")
               .to_table().to_pylist() if r["id"] == "good-6")
    img = np.frombuffer(row["image"], dtype=np.uint8).reshape(32, 32, 3)
    assert tuple(img[0, 16]) == (122, 116, 104)  # int(CLIP mean * 255): the padding band above the image
    assert tuple(img[16, 16]) == (255, 0, 0)  # red at half alpha: alpha dropped as LLaVA's convert('RGB')


def test_jsonl_input_gives_the_same_records(ray_cluster, bad_world, tmp_path):
    root, recs, _ = bad_world
    cfg = config(root, root / "data.jsonl", root / "images", tmp_path / "out")
    report = prepare(cfg)
    assert report.records_in == len(recs) + 1
    assert report.written == 12 and report.rejects_by_reason["invalid_json"] == 1
    assert report.rejects_by_reason["nested_too_deep"] == 1 and report.rejects_by_reason["image_outside_root"] == 3
    assert report.records_in == report.written + report.rejected


def test_fail_mode_names_the_record(ray_cluster, bad_world, tmp_path):
    root, _, _ = bad_world
    cfg = config(root, root / "data.json", root / "images", tmp_path / "out", **{"data.on_bad_record": "fail"})
    with pytest.raises(PreprocessError, match=r"on_bad_record: fail.*record '\w+' \(row \d+\)"):
        prepare(cfg)


def test_existing_output_is_never_overwritten_silently(array_run):
    cfg, _ = array_run
    with pytest.raises(PreprocessError, match="already holds files.*overwrite: true"):
        prepare(cfg)


def test_missing_data_path(ray_cluster, tmp_path):
    cfg = config(tmp_path, tmp_path / "absent.json", tmp_path, tmp_path / "out")
    with pytest.raises(PreprocessError, match="does not exist"):
        prepare(cfg)


def test_reader_and_collate_feed_the_model(array_run):
    from llava_platform.model.presets import build_preset

    cfg, _ = array_run
    ds, manifest = open_prepared(cfg.output_path)
    model, processor = build_preset("tiny")
    ip = processor.image_processor
    collate = LlavaCollator(processor.tokenizer.pad_token_id, ip.image_mean, ip.image_std,
                            image_size=manifest.sample_spec.image_size)
    seen = 0
    for batch in ds.iter_batches(batch_size=4, batch_format="pandas"):
        samples = batch.to_dict("records")
        tensors = collate(samples)
        assert tensors["input_ids"].shape[0] == len(samples)
        assert np.isfinite(model(**tensors).loss.item())
        seen += len(samples)
    assert seen == manifest.written


@pytest.mark.s3
def test_s3_end_to_end(ray_cluster, s3_server, bad_world, monkeypatch):
    root, recs, _ = bad_world
    bucket = s3_server.new_bucket()
    images = root / "s3_images"  # the images without the symlink to /dev/zero (an upload would read it)
    if not images.exists():
        shutil.copytree(root / "images", images, ignore=lambda d, names: [n for n in names if n == "zero.png"])
    storage.upload_dir(images, f"s3://{bucket}/images", s3_server.storage_config())
    storage.write_bytes(f"s3://{bucket}/outside.png", (root / "outside.png").read_bytes(), s3_server.storage_config())
    storage.write_bytes(f"s3://{bucket}/data.json", (root / "data.json").read_bytes(), s3_server.storage_config())
    cfg = config(root, f"s3://{bucket}/data.json", f"s3://{bucket}/images", f"s3://{bucket}/prepared",
                 **{"storage.endpoint_url": s3_server.endpoint_url, "storage.access_key_id": s3_server.access_key_id,
                    "storage.secret_access_key": s3_server.secret_access_key, "storage.region": s3_server.region})
    report = prepare(cfg)
    assert report.records_in == len(recs) == report.written + report.rejected and report.written == 12
    manifest = read_manifest(cfg.output_path, cfg.storage)
    assert manifest.written == 12
    rejects = [json.loads(line) for line in storage.read_bytes(f"s3://{bucket}/prepared/rejects.jsonl", cfg.storage).splitlines()]
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert reasons["missing"] == reasons["devzero"] == "image_missing"
    assert reasons["escape"] == reasons["passwd"] == reasons["absolute"] == "image_outside_root"
    assert reasons["bigfile"] == "image_file_too_large" and reasons["empty"] == "zero_size_image", rejects
    ds, _ = open_prepared(cfg.output_path, cfg.storage)
    assert ds.count() == 12


def test_prepared_set_feeds_a_two_worker_train_loop(array_run, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Defined here so that cloudpickle ships it by value (workers cannot import test modules).
    def _smoke_loop(config):
        """Per-worker loop: stream this worker's shard, collate, take DDP steps on the tiny model."""
        import json as _json
        import os as _os

        import ray.train
        import ray.train.torch
        import torch

        from llava_platform.data.sample import LlavaCollator
        from llava_platform.train.freezing import apply_stage
        from llava_platform.model.presets import build_preset

        model, processor = build_preset("tiny", seed=0)
        apply_stage(model, "finetune")
        # Frozen tower; text-only batches leave the projector unused: DDP must allow unused parameters.
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
        ip = processor.image_processor
        collate = LlavaCollator(processor.tokenizer.pad_token_id, ip.image_mean, ip.image_std,
                                image_size=config["image_size"])
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        ids, losses = [], []
        for batch in ray.train.get_dataset_shard("train").iter_batches(batch_size=2, batch_format="pandas"):
            samples = batch.to_dict("records")
            loss = model(**collate(samples)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            ids += [s["id"] for s in samples]
            losses.append(loss.item())
        rank = ray.train.get_context().get_world_rank()
        with open(_os.path.join(config["out"], f"rank{rank}.json"), "w") as f:
            _json.dump({"ids": ids, "losses": losses}, f)
        ray.train.report({"steps": len(losses)})

    cfg, report = array_run
    ds, manifest = open_prepared(cfg.output_path)
    trainer = TorchTrainer(
        _smoke_loop,
        train_loop_config={"image_size": manifest.sample_spec.image_size, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="prepared-smoke", storage_path=str(tmp_path / "runs")),
        datasets={"train": ds},
    )
    trainer.fit()
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(s["losses"] and all(np.isfinite(s["losses"])) for s in seen)
    ids = seen[0]["ids"] + seen[1]["ids"]
    assert len(ids) == len(set(ids))  # the shards do not overlap
    assert len(ids) >= report.written - 1  # equal splits may drop one row of an odd count
