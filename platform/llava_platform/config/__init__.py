"""Typed, strict run configuration: pydantic models, YAML loading and dotted overrides."""

from llava_platform.config.loader import apply_overrides, load_config, parse_overrides
from llava_platform.config.components import ComponentsJobConfig, LanguageModelSpec, VisionTowerSpec
from llava_platform.config.schema import (
    DataConfig,
    EvalConfig,
    ModelSpec,
    PreprocessJobConfig,
    ServeConfig,
    StorageConfig,
    TrackingConfig,
    TrainConfig,
    TrainJobConfig,
    EvalJobConfig,
)

__all__ = [
    "ComponentsJobConfig",
    "LanguageModelSpec",
    "VisionTowerSpec",
    "DataConfig",
    "EvalConfig",
    "EvalJobConfig",
    "ModelSpec",
    "PreprocessJobConfig",
    "ServeConfig",
    "StorageConfig",
    "TrackingConfig",
    "TrainConfig",
    "TrainJobConfig",
    "apply_overrides",
    "load_config",
    "parse_overrides",
]
