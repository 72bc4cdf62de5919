"""The worker's arguments are one typed object: it keeps secrets as SecretStr, survives the pickling
Ray does on the way to a worker unchanged, and refuses a job that does not fit its objective."""

import pickle

import pytest
from pydantic import SecretStr, ValidationError

from llava_platform.config import TrainJobConfig, load_config
from llava_platform.config.components import ComponentRunConfig
from llava_platform.train.worker import WorkerArgs


def test_args_travel_whole_with_their_secrets_kept_secret(tmp_path):
    job = load_config(None, TrainJobConfig, [
        "name=t", "model.preset=tiny", f"prepared_data={tmp_path}", f"storage_path={tmp_path}", f"output_path={tmp_path}/o",
        "train.stage=finetune", "train.global_batch_size=2", "train.micro_batch_size=2", "train.lr=1e-3",
        "storage.secret_access_key=very-secret"])
    args = WorkerArgs(objective="llava", job=job, run_name="t", total_steps=3, output_path=job.output_path,
                      storage=job.storage, image_size=32)
    again = pickle.loads(pickle.dumps(args))
    assert again == args and isinstance(again.job, TrainJobConfig)
    assert isinstance(again.storage.secret_access_key, SecretStr)
    assert again.storage.secret_access_key.get_secret_value() == "very-secret"
    assert "very-secret" not in repr(again) and "very-secret" not in str(again.model_dump())


def test_stage0_runs_need_their_tokenizer():
    run = ComponentRunConfig.model_validate({"name": "lm", "component": "language_model",
                                             "train": {"stage": "language_model", "global_batch_size": 2,
                                                       "micro_batch_size": 2, "lr": 1e-3}})
    with pytest.raises(ValidationError, match="needs tokenizer_dir"):
        WorkerArgs(objective="language_model", job=run, run_name="lm", total_steps=1, output_path="o")
    assert WorkerArgs(objective="language_model", job=run, run_name="lm", total_steps=1, output_path="o",
                      tokenizer_dir="tok").job.component == "language_model"
