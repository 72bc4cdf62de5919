import pytest

from llava_platform.config import TrainJobConfig, load_config
from llava_platform.train.trainer import TrainingError, check_data_matches_model, steps_for


def job(**sets):
    base = {"name": "r", "model.preset": "tiny", "prepared_data": "/p", "storage_path": "/s", "output_path": "/o",
            "train.stage": "pretrain", "train.global_batch_size": 8, "train.micro_batch_size": 2,
            "train.num_workers": 2, "train.lr": 1e-3}
    base.update(sets)
    return load_config(None, TrainJobConfig, [f"{k}={v}" for k, v in base.items()])


def test_steps_from_epochs_and_max_steps():
    # 100 records / 2 workers = 50 each -> 25 micro-batches -> 12 steps of accumulation 2
    assert steps_for(job(), 100) == 12
    assert steps_for(job(**{"train.epochs": 2.5}), 100) == 31
    assert steps_for(job(**{"train.max_steps": 7}), 100) == 7
    with pytest.raises(TrainingError, match="no full micro-batch"):
        steps_for(job(), 3)


def test_data_must_match_model():
    from llava_platform.data.pipeline import tokenizer_fingerprint
    from llava_platform.model.builder import build_preset

    model, processor = build_preset("tiny")
    good = {"template": "plain", "tokenizer_sha256": tokenizer_fingerprint(processor.tokenizer),
            "sample_spec": {"image_size": 32, "num_image_tokens": 16}}
    check_data_matches_model(job(), good, processor.tokenizer, model.config)
    with pytest.raises(TrainingError, match="template 'plain'.*trains with a conversation template \\('vicuna_v1'"):
        check_data_matches_model(job(**{"train.stage": "finetune"}), good, processor.tokenizer, model.config)
    for template in ("vicuna_v1", "llava_v1"):  # stage 2 takes data prepared in either
        check_data_matches_model(job(**{"train.stage": "finetune"}), {**good, "template": template},
                                 processor.tokenizer, model.config)
    with pytest.raises(TrainingError, match="template 'vicuna_v1', but stage pretrain trains with 'plain'"):
        check_data_matches_model(job(), {**good, "template": "vicuna_v1"}, processor.tokenizer, model.config)
    with pytest.raises(TrainingError, match="different tokenizer"):
        check_data_matches_model(job(), {**good, "tokenizer_sha256": "0" * 64}, processor.tokenizer, model.config)
    with pytest.raises(TrainingError, match="holds 64 px images"):
        check_data_matches_model(job(), {**good, "sample_spec": {"image_size": 64, "num_image_tokens": 64}},
                                 processor.tokenizer, model.config)


@pytest.mark.ray
def test_workers_must_leave_a_cpu_for_the_data(ray_cluster):
    import ray

    from llava_platform.train.trainer import check_room_for_data

    total = ray.cluster_resources()["CPU"]
    check_room_for_data(total - 1)
    with pytest.raises(TrainingError, match=r"leaving less than 1 for reading the data"):
        check_room_for_data(total - 0.5)
