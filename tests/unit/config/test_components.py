"""Stage 0's configs: each part's sizes are checked where they are given, and each run's stage is
fixed by its section."""

import pytest
from pydantic import ValidationError

from llava_platform.config.components import ComponentsJobConfig, LanguageModelSpec, VisionTowerSpec

TRAIN = {"global_batch_size": 4, "micro_batch_size": 2, "lr": 1e-3}


def test_part_sizes_are_checked():
    with pytest.raises(ValidationError, match="image_size 100 is not a multiple of patch_size 32"):
        VisionTowerSpec(image_size=100)
    with pytest.raises(ValidationError, match="hidden_size 130 is not a multiple of heads 4"):
        LanguageModelSpec(hidden_size=130)
    with pytest.raises(ValidationError, match="vocab_size"):
        LanguageModelSpec(vocab_size=256)


def test_each_run_takes_its_sections_stage():
    job = ComponentsJobConfig(world="w", output_path="o", storage_path="s", vision_tower_train=TRAIN,
                              language_model_train=TRAIN)
    assert (job.vision_tower_train.stage, job.language_model_train.stage) == ("vision_tower", "language_model")
    with pytest.raises(ValidationError, match="vision_tower_train.stage must be vision_tower"):
        ComponentsJobConfig(world="w", output_path="o", storage_path="s", language_model_train=TRAIN,
                            vision_tower_train={**TRAIN, "stage": "pretrain"})
    with pytest.raises(ValidationError, match="group_by_modality_length"):
        ComponentsJobConfig(world="w", output_path="o", storage_path="s", language_model_train=TRAIN,
                            vision_tower_train={**TRAIN, "group_by_modality_length": True})
