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


def _manifest(template: str, tokenizer_sha256: str, image_size: int = 32, num_image_tokens: int = 16):
    from llava_platform.data.prepared import Manifest
    from llava_platform.data.sample import SampleSpec

    spec = SampleSpec(template, 64, image_size, num_image_tokens, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return Manifest(stage="pretrain", records_in=1, written=1, rejected=0, rejects_by_reason={}, normalised_by_kind={},
                    template=template, template_sha256="", tokenizer_sha256=tokenizer_sha256, sample_spec=spec,
                    image_layout={}, sources={}, config={}, created_unix=0)


def test_data_must_match_model():
    from llava_platform.data.pipeline import tokenizer_fingerprint
    from llava_platform.model.presets import build_preset

    model, processor = build_preset("tiny")
    sha = tokenizer_fingerprint(processor.tokenizer)
    good = _manifest("plain", sha)
    check_data_matches_model(job(), good, processor.tokenizer, model.config)
    with pytest.raises(TrainingError, match="template 'plain'.*trains with a conversation template \\('vicuna_v1'"):
        check_data_matches_model(job(**{"train.stage": "finetune"}), good, processor.tokenizer, model.config)
    for template in ("vicuna_v1", "llava_v1"):  # stage 2 takes data prepared in either
        check_data_matches_model(job(**{"train.stage": "finetune"}), _manifest(template, sha),
                                 processor.tokenizer, model.config)
    with pytest.raises(TrainingError, match="template 'vicuna_v1', but stage pretrain trains with 'plain'"):
        check_data_matches_model(job(), _manifest("vicuna_v1", sha), processor.tokenizer, model.config)
    with pytest.raises(TrainingError, match="different tokenizer"):
        check_data_matches_model(job(), _manifest("plain", "0" * 64), processor.tokenizer, model.config)
    with pytest.raises(TrainingError, match="holds 64 px images"):
        check_data_matches_model(job(), _manifest("plain", sha, 64, 64), processor.tokenizer, model.config)


@pytest.mark.ray
def test_workers_must_leave_a_cpu_for_the_data(ray_cluster):
    import ray

    from llava_platform.train.trainer import check_room_for_data

    total = ray.cluster_resources()["CPU"]
    check_room_for_data(total - 1)
    with pytest.raises(TrainingError, match=r"leaving less than 1 for reading the data"):
        check_room_for_data(total - 0.5)
