"""What the driver hands each Ray Train worker: one typed object (``train_loop_config={"args": ...}``),
passed whole, so a worker reads fields, not string keys, and secrets stay ``SecretStr`` on the way."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from llava_platform.config.components import ComponentRunConfig
from llava_platform.config.schema import StorageConfig, TrainJobConfig

ObjectiveKind = Literal["llava", "vision_tower", "language_model"]


class WorkerArgs(BaseModel):
    """One training run as its workers see it."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    objective: ObjectiveKind
    # A LLaVA stage's job, or one stage-0 run (its `train` section: the run's settings).
    job: TrainJobConfig | ComponentRunConfig
    run_name: str
    total_steps: int
    # Where the export goes (local or s3://).
    output_path: str
    storage: StorageConfig = StorageConfig()
    # MLflow: the server, the run rank 0 logs into, and where it spools what it could not send.
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    tracking_spool: str | None = None
    system_metrics_interval_s: float | None = None
    registered_model_name: str | None = None
    # Stage 2: the stage-1 run its model came from (lineage).
    parent_run_id: str | None = None
    # LLaVA stages: the prepared shards' image size and template (the export records the template).
    image_size: int | None = None
    template: str | None = None
    # Stage 0: the world's tokenizer, shared by both parts.
    tokenizer_dir: str | None = None
    deepspeed_overrides: dict[str, Any] | None = None
    # Tests: a directory where each rank appends the ids every step trained on.
    trace_dir: str | None = None

    @model_validator(mode="after")
    def _fits_objective(self) -> "WorkerArgs":
        if (self.objective == "llava") != isinstance(self.job, TrainJobConfig):
            raise ValueError(f"objective {self.objective} does not train a {type(self.job).__name__}")
        if self.objective == "llava" and self.image_size is None:
            raise ValueError("a LLaVA stage needs the prepared data's image_size")
        if self.objective != "llava" and self.tokenizer_dir is None:
            raise ValueError(f"stage 0's {self.objective} needs tokenizer_dir")
        return self
