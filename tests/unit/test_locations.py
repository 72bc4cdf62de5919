"""Job configs with local paths made absolute for Ray workers; hub ids and URIs left alone."""

import os

import pytest

from llava_platform.config.schema import ModelSpec, PreprocessJobConfig, ServeConfig, TrainJobConfig
from llava_platform.errors import StorageError
from llava_platform.locations import absolute_paths, serve_paths


def test_local_paths_become_absolute_for_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "init").mkdir(parents=True)
    job = TrainJobConfig(name="r", model={"checkpoint": "models/init"}, prepared_data="data/p",
                         storage_path="s3://b/runs", output_path="out",
                         train={"stage": "pretrain", "global_batch_size": 2, "micro_batch_size": 2, "lr": 1.0})
    a = absolute_paths(job)
    assert a.model.checkpoint == str(tmp_path / "models" / "init")
    assert (a.prepared_data, a.storage_path, a.output_path) == (str(tmp_path / "data/p"), "s3://b/runs", str(tmp_path / "out"))
    hub = ModelSpec(vision_tower="openai/clip-vit-large-patch14-336", llm="lmsys/vicuna-7b-v1.5")
    pre = absolute_paths(PreprocessJobConfig(stage="pretrain", model=hub, output_path="o",
                                             data={"data_path": "d.json", "image_root": "imgs"}))
    assert pre.model.vision_tower == "openai/clip-vit-large-patch14-336"  # a hub id, not a path
    assert pre.data.image_root == str(tmp_path / "imgs") and pre.output_path == str(tmp_path / "o")


def test_relative_paths_under_ray_job_submit_use_the_workspace_or_are_refused(tmp_path, monkeypatch):
    """Measured before: `ray job submit --working-dir .` with the smoke configs wrote outputs into
    Ray's temporary copy of the working directory, deleted after the job."""
    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("LLAVA_WORKSPACE", raising=False)
    job = TrainJobConfig(name="r", model={"preset": "tiny"}, prepared_data="data/p", storage_path="runs",
                         output_path="/abs/out", train={"stage": "pretrain", "global_batch_size": 2,
                                                        "micro_batch_size": 2, "lr": 1.0})
    with pytest.raises(StorageError, match="storage_path 'runs' is relative.*temporary copy.*LLAVA_WORKSPACE"):
        absolute_paths(job)
    monkeypatch.setenv("LLAVA_WORKSPACE", str(tmp_path / "ws"))
    a = absolute_paths(job)
    assert (a.prepared_data, a.storage_path, a.output_path) == (
        str(tmp_path / "ws" / "data" / "p"), str(tmp_path / "ws" / "runs"), "/abs/out")
    monkeypatch.setenv("LLAVA_WORKSPACE", "s3://bucket/work")
    assert absolute_paths(job).storage_path == "s3://bucket/work/runs"
    monkeypatch.delenv("LLAVA_WORKSPACE")
    monkeypatch.chdir(tmp_path)  # an ordinary directory: relative paths as before
    assert absolute_paths(job).storage_path == str(tmp_path / "runs")


def test_relative_model_paths_become_absolute_and_uris_stay(tmp_path, monkeypatch):
    (tmp_path / "export").mkdir()
    monkeypatch.chdir(tmp_path)
    assert serve_paths(ServeConfig(model="export")).model == os.path.join(str(tmp_path), "export")
    for uri in ("s3://bucket/export", "models:/llava/3", "runs:/abc/export", "llava-hf/llava-1.5-7b-hf"):
        assert serve_paths(ServeConfig(model=uri)).model == uri
