"""Model URIs and lineage: local paths pass through, s3:// and MLflow URIs download, and an export's
lineage names the run that made it however the export is addressed."""

from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from llava_platform import storage
from llava_platform.errors import ModelBuildError
from llava_platform.tracking.models import (
    LINEAGE_FILE,
    is_local,
    producing_run_id,
    read_lineage,
    resolve_model_uri,
    write_lineage,
)


def test_local_paths_and_hub_ids_pass_through(tmp_path):
    assert resolve_model_uri(str(tmp_path)) == str(tmp_path)
    assert resolve_model_uri("lmsys/vicuna-7b-v1.5") == "lmsys/vicuna-7b-v1.5"
    assert is_local("lmsys/vicuna-7b-v1.5") and is_local(str(tmp_path))
    assert not is_local("runs:/abc/export") and not is_local("models:/m/1") and not is_local("s3://b/m")


def test_lineage_from_a_local_an_s3_and_an_mlflow_export(tmp_path, s3_env, monkeypatch):
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"weights")
    assert read_lineage(str(export)) == {} and producing_run_id(str(export)) is None  # not trained here
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as run:
        write_lineage(str(export), {"mlflow_run_id": run.info.run_id, "stage": "pretrain"})
        mlflow.log_artifacts(str(export), "export")
    MlflowClient(uri).create_registered_model("m")
    MlflowClient(uri).create_model_version("m", f"runs:/{run.info.run_id}/export", run.info.run_id)
    bucket = s3_env.new_bucket()
    storage.upload_dir(str(export), f"s3://{bucket}/export")

    for where in (str(export), f"s3://{bucket}/export", f"runs:/{run.info.run_id}", "models:/m/1"):
        assert read_lineage(where)["stage"] == "pretrain", where
        assert producing_run_id(where) == run.info.run_id, where
    without_weights = resolve_model_uri(f"runs:/{run.info.run_id}", weights=False)
    assert sorted(p.name for p in Path(without_weights).iterdir()) == [LINEAGE_FILE]
    assert producing_run_id("models:/m/7") is None and producing_run_id(None) is None


def test_missing_models_name_their_uri(tmp_path, s3_env, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    bucket = s3_env.new_bucket()
    for uri in (f"s3://{bucket}/nothing", "models:/absent/1"):
        with pytest.raises(ModelBuildError, match=uri.split("/")[-2]):
            resolve_model_uri(uri)
