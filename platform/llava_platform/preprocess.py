"""The preprocess job: the model's processor (``model/``, without weights where it can) gives the
tokenizer and sample spec; the Ray Data pipeline (``data/``) prepares the records with them.

    llava-platform data prepare --config jobs/configs/pretrain_small.yaml
    python jobs/preprocess.py --config ...
"""

from __future__ import annotations

from typing import Any

from llava_platform.config.schema import STAGE_TEMPLATES, PreprocessJobConfig
from llava_platform.data.images import Decoding
from llava_platform.data.pipeline import PrepareReport, run_pipeline
from llava_platform.data.sample import SampleSpec
from llava_platform.locations import absolute_paths


def sample_spec_for(cfg: PreprocessJobConfig) -> tuple[Any, SampleSpec]:
    """The tokenizer and sample spec a preprocess config implies."""
    from llava_platform.model.builder import load_processor

    processor, model_config = load_processor(cfg.model, cfg.storage)
    template = cfg.data.template or STAGE_TEMPLATES[cfg.stage]
    spec = SampleSpec.from_processor(processor, model_config, template, cfg.data.max_length,
                                     cfg.data.image_aspect_ratio, cfg.data.max_image_pixels,
                                     cfg.data.max_image_aspect_ratio, Decoding.from_config(cfg.data),
                                     cfg.data.record_policy)
    return processor.tokenizer, spec


def prepare(cfg: PreprocessJobConfig) -> PrepareReport:
    """Run the preprocessing job (Ray must be initialised; see :func:`llava_platform.ray_utils.init_ray`).

    Raises:
        PreprocessError: a bad record under ``on_bad_record: fail``, an existing output, or an
            accounting mismatch (records lost).
        ModelBuildError: the model's processor cannot be loaded.
    """
    cfg = absolute_paths(cfg)
    tokenizer, spec = sample_spec_for(cfg)
    return run_pipeline(cfg, tokenizer, spec)


def run_prepare(cfg: PreprocessJobConfig) -> PrepareReport:
    """Run the job and print its summary table (the entry points' library function)."""
    report = prepare(cfg)
    print(report.table())
    return report
