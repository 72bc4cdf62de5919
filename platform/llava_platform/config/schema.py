"""Typed configuration models. Every model is strict about keys (``extra="forbid"``) so that a typo
in a YAML file or a ``--set`` override is an error that names the key, never a silently ignored value.

The sections are shared by the job configs at the bottom of this file: a preprocess job, a training
job (one per LLaVA stage), an evaluation job; the Serve application has its own ``ServeConfig``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

#: LLaVA's two stages (feature alignment, visual instruction tuning).
LlavaStage = Literal["pretrain", "finetune"]
#: Stage 0 of the embedded default: the pretrained parts LLaVA composes, made on the synthetic world.
ComponentStage = Literal["vision_tower", "language_model"]
Stage = Literal["pretrain", "finetune", "vision_tower", "language_model"]
TemplateName = Literal["plain", "vicuna_v1", "llava_v1"]
#: How an image is made square before the tower: LLaVA's ``--image_aspect_ratio`` (``pad`` for 1.5).
AspectRatio = Literal["pad", "resize", "crop"]

#: The conversation template each LLaVA stage trains with by default (LLaVA-1.5: ``plain`` for
#: feature alignment, ``vicuna_v1`` (``--version v1``) for visual instruction tuning).
STAGE_TEMPLATES: dict[str, str] = {"pretrain": "plain", "finetune": "vicuna_v1"}

#: Images longer one way than the other by more than this are refused by default, before decoding
#: (preprocessing and serving alike).
MAX_IMAGE_ASPECT_RATIO = 20.0


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors; assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(StrictModel):
    """Where S3 credentials and the endpoint come from. Every field falls back to the standard AWS
    environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
    ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, ``AWS_REGION``), then to botocore's own chain
    (profiles, instance roles)."""

    # S3-compatible endpoint (MinIO, moto, Ceph...); None means AWS itself.
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    # Anonymous access to public buckets: no credentials are looked up.
    anon: bool = False


class ModelSpec(StrictModel):
    """Which LLaVA model to build or load. Exactly one source:

    - ``preset``: a tiny or small model built from config with a locally trained tokenizer;
    - ``checkpoint``: an existing LLaVA checkpoint in HF format (llava-hf or one of ours);
    - ``vision_tower`` + ``llm``: compose a new LLaVA from a CLIP vision tower and a causal LM.

    Paths may be local, ``s3://`` URIs, or (for the last two) hub ids where a hub is reachable.
    """

    preset: Literal["tiny", "small"] | None = None
    checkpoint: str | None = None
    vision_tower: str | None = None
    llm: str | None = None
    # Tokenizer source when it is not stored beside the LLM weights.
    tokenizer: str | None = None
    # LLaVA-1.5 uses a two-layer MLP with GELU; LLaVA-1.0 a single linear layer.
    projector_type: Literal["linear", "mlp2x_gelu"] = "mlp2x_gelu"
    # LLaVA takes the penultimate CLIP layer: the last one is tuned for the contrastive head.
    vision_feature_layer: int = -2
    # "default" drops CLIP's CLS token (LLaVA), "full" keeps it.
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    # Seed for random initialisation (presets, new projector).
    seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        sources = [
            name
            for name, given in (
                ("preset", self.preset is not None),
                ("checkpoint", self.checkpoint is not None),
                ("vision_tower+llm", self.vision_tower is not None or self.llm is not None),
            )
            if given
        ]
        if len(sources) != 1:
            raise ValueError(
                "give exactly one model source: `preset`, `checkpoint`, or `vision_tower` + `llm`"
                f" (got {', '.join(sources) or 'none'})"
            )
        if sources == ["vision_tower+llm"] and (self.vision_tower is None or self.llm is None):
            raise ValueError("composing a model needs both `vision_tower` and `llm`")
        return self


class ImageDecoding(StrictModel):
    """How image files become RGB pixels: LLaVA's ``Image.open(f).convert("RGB")`` by default (the
    stored orientation, transparency dropped, as its box coordinates and training assume)."""

    # Rotate by the EXIF orientation tag (LLaVA does not).
    image_exif_transpose: bool = False
    # Composite transparent images over this colour; None: drop the alpha channel as LLaVA does.
    image_alpha_background: tuple[int, int, int] | None = None

    @model_validator(mode="after")
    def _check_colour(self) -> "ImageDecoding":
        bg = self.image_alpha_background
        if bg is not None and not all(0 <= c <= 255 for c in bg):
            raise ValueError(f"image_alpha_background must be three values in 0..255, got {list(bg)}")
        return self


class DataConfig(ImageDecoding):
    """A LLaVA-format dataset and how to turn it into training records."""

    # LLaVA JSON array or JSONL of {id, image?, conversations}; local path or s3:// URI.
    data_path: str
    # Folder the records' `image` fields are relative to.
    image_root: str | None = None
    # None: the stage's template (plain for pretrain, vicuna_v1 for finetune; llava_v1 for data made for it).
    template: TemplateName | None = None
    # LLaVA-1.5 trains with 2048 tokens; image tokens count towards it.
    max_length: int = Field(2048, gt=0)
    # LLaVA-1.5 pads images to a square with the processor's mean colour.
    image_aspect_ratio: AspectRatio = "pad"
    # Decompression-bomb guard (Pillow's own default limit).
    max_image_pixels: int = Field(89_478_485, gt=0)
    # Thinner images are rejected (image_aspect_ratio) before decoding; so is one whose padded
    # square is over max_image_pixels.
    max_image_aspect_ratio: float = Field(MAX_IMAGE_ASPECT_RATIO, ge=1)
    # Image files are read only up to this size (larger: image_file_too_large); devices, FIFOs and
    # other non-regular files are never read (image_not_a_file).
    max_image_bytes: int = Field(64 * 1024 * 1024, gt=0)
    # llava: keep what LLaVA's training code accepts, normalised as it does (a leading gpt turn dropped,
    # <image> added to an image record without one, repeated <image> in a turn made one), each counted
    # by kind in the manifest; strict: reject those records.
    record_policy: Literal["llava", "strict"] = "llava"
    on_bad_record: Literal["skip", "fail"] = "skip"


class LoraConfig(StrictModel):
    """LoRA on the language model (stage 2); the projector still trains fully."""

    r: int = Field(128, gt=0)
    alpha: int = Field(256, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TrainConfig(StrictModel):
    """One LLaVA training stage on Ray Train + DeepSpeed."""

    stage: Stage
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    # Extra Ray resources each worker needs (custom node labels, e.g. {"a100_slot": 1}).
    resources_per_worker: dict[str, float] = {}
    accelerator_type: str | None = None
    # global batch = micro batch x gradient accumulation x workers
    global_batch_size: int = Field(gt=0)
    micro_batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    # The projector's own learning rate in stage 2 (LLaVA's `mm_projector_lr`; its LoRA scripts set 2e-5).
    projector_lr: float | None = Field(None, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: float = Field(1.0, gt=0)
    # Stops early when set (smoke runs); otherwise derived from epochs and the dataset size.
    max_steps: int | None = Field(None, gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    # TF32 for fp32 matmuls and convolutions on Ampere or later GPUs (LLaVA passes --tf32 True);
    # nothing changes on CPU.
    tf32: bool = False
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = False
    group_by_modality_length: bool = False
    unfreeze_vision_tower: bool = False
    lora: LoraConfig | None = None
    # Log, at each logging step, the micro-batch's loss with its images blanked (the mean colour)
    # beside its real loss: what the images contribute (the proof of stage 1's alignment).
    blank_image_probe: bool = False
    save_steps: int = Field(500, gt=0)
    num_to_keep: int = Field(2, gt=0)
    max_failures: int = Field(3, ge=-1)
    logging_steps: int = Field(1, gt=0)
    # Peak dense FLOP/s of one device, in TFLOP/s, for MFU. None: looked up for known GPUs in bf16/fp16
    # (train/flops.py); on CPU, in fp32 or on other GPUs MFU is reported only when this is set.
    peak_tflops: float | None = Field(None, gt=0)
    seed: int = 42

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        per_step = self.micro_batch_size * self.num_workers
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of"
                f" micro_batch_size x num_workers ({self.micro_batch_size} x {self.num_workers} = {per_step})"
            )
        if self.lora is not None and self.stage != "finetune":
            raise ValueError("`lora` applies to stage `finetune` only (stage 1 trains the projector alone)")
        if self.stage in ("vision_tower", "language_model") and (self.unfreeze_vision_tower or self.blank_image_probe):
            raise ValueError(f"`unfreeze_vision_tower` and `blank_image_probe` are LLaVA-stage settings, not for {self.stage}")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("`offload_params` needs zero_stage 3")
        return self

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.num_workers)


class TrackingConfig(StrictModel):
    """MLflow tracking. With no URI, ``MLFLOW_TRACKING_URI`` is used, else a local SQLite store."""

    tracking_uri: str | None = None
    experiment: str = "llava-platform"
    # Artifact root for a new experiment (local dir or s3://); None: the tracking server's default.
    artifact_location: str | None = None
    # Register the final export as a new version of this model; None skips registration.
    registered_model_name: str | None = None
    # MLflow system metrics (CPU, memory, GPU utilisation and memory) from each node's first worker,
    # sampled every this many seconds; None turns them off.
    system_metrics_interval_s: float | None = Field(10.0, gt=0)


class ServeConfig(ImageDecoding):
    """The Ray Serve application's arguments (replica counts, autoscaling and per-replica resources
    live in serve_config.yaml, per deployment)."""

    # Model URI: local path, s3://, or MLflow (models:/name/version, runs:/id/path).
    model: str
    # The name clients pass as `model`, and /v1/models lists.
    model_name: str = "llava"
    # MLflow tracking server for models:/ and runs:/ URIs (default: MLFLOW_TRACKING_URI).
    tracking_uri: str | None = None
    storage: StorageConfig = StorageConfig()
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # How images are squared before the vision tower; use what the model was trained with.
    image_aspect_ratio: AspectRatio = "pad"
    # Bearer key (programmatic use only: Ray echoes application arguments in its logs, dashboard and
    # `serve config`, so the Serve app refuses it there). Otherwise the key is read from
    # api_key_file (a path on every node) or LLAVA_API_KEY in the nodes' environment; none of the
    # three: no auth.
    api_key: SecretStr | None = None
    api_key_file: str | None = None
    # Serve the web chat page at the route prefix (GET /); its API calls need the key like any client.
    chat_page: bool = True
    max_new_tokens_limit: int = Field(1024, gt=0)
    max_images_per_request: int = Field(1, gt=0)
    max_image_bytes: int = Field(10 * 1024 * 1024, gt=0)
    # Refused before decoding: a small file that expands to a huge image (decompression bomb).
    max_image_pixels: int = Field(50_000_000, gt=0)
    # Images wider than tall (or taller than wide) by more than this are refused before decoding:
    # padding a 1x100000 image to a square would need 30 GB.
    max_image_aspect_ratio: float = Field(MAX_IMAGE_ASPECT_RATIO, ge=1)
    max_body_bytes: int = Field(20 * 1024 * 1024, gt=0)
    # Characters of message text, checked before tokenizing (the context length bounds tokens).
    max_prompt_chars: int = Field(262_144, gt=0)
    # Hosts from which http(s) image URLs may be fetched; empty: data: URLs only.
    allowed_image_hosts: list[str] = []
    # Projected image embeddings kept per VisionEncoder replica, keyed by the image's content hash.
    encoder_cache_size: int = Field(1024, ge=0)
    # Images encoded together, and how long a VisionEncoder batch waits to fill (0: take what is queued).
    encoder_batch_size: int = Field(16, gt=0)
    encoder_batch_wait_timeout_s: float = Field(0.0, ge=0)
    # Rows that decode together in the LanguageModel, and how long @serve.batch waits to group new
    # calls. With continuous batching, calls that arrive during a decode join it at the next step
    # anyway, so a wait only adds latency (measured: bench/serve.py --batch-wait).
    max_batch_size: int = Field(16, gt=0)
    batch_wait_timeout_s: float = Field(0.0, ge=0)
    # How long a request may wait for a LanguageModel replica to take it (its images encoded first)
    # before a 503 with Retry-After: no replica running (one is being replaced), or all full.
    replica_wait_timeout_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _one_key_source(self) -> "ServeConfig":
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("give the API key as api_key or as api_key_file, not both")
        return self


class JudgeConfig(StrictModel):
    """An OpenAI-compatible endpoint used as the LLM judge (LLaVA-Bench style review)."""

    base_url: str
    model: str
    api_key: SecretStr | None = None
    # LLaVA's eval_gpt_review_bench.py samples the judge at 0.2.
    temperature: float = Field(0.2, ge=0, le=2)
    max_tokens: int = Field(1024, gt=0)
    # LLaVA's context file (JSONL, local or s3://): per image its `caption`(s) and, for COCO, `instances`
    # with boxes; the judge sees them in place of the image.
    context: str | None = None
    # LLaVA's rule file (llava/eval/table/rule.json); without it, the same instructions in our words.
    rules: str | None = None


class EvalConfig(ImageDecoding):
    """Batch evaluation on a LLaVA model_vqa question file."""

    questions: str
    image_root: str
    # JSONL of {question_id, answer} (or LLaVA's `label` for POPE, `text` for its GPT-4 references),
    # with `category` where the question file has none.
    answers_key: str | None = None
    output_dir: str
    # The prompt format; None: the model's own chat template (the one it was trained with).
    template: TemplateName | None = None
    max_new_tokens: int = Field(16, gt=0)
    # Questions per generate call in each actor (they decode together, greedy).
    batch_size: int = Field(16, gt=0)
    # Model actors in the Ray Data pool; each holds one copy of the model.
    num_actors: int = Field(1, gt=0)
    cpus_per_actor: float = Field(1.0, gt=0)
    # One GPU per actor on a cluster.
    use_gpu: bool = False
    image_aspect_ratio: AspectRatio = "pad"
    max_image_pixels: int = Field(89_478_485, gt=0)
    # Also answer every question with the image withheld (the "blind" baseline).
    blind_baseline: bool = True
    # Categories scored as POPE (yes/no), each alone and together; LLaVA's POPE question file has
    # adversarial, popular and random.
    yes_no_categories: list[str] = ["yes_no", "adversarial", "popular", "random"]
    # How answers are read as yes/no: llava (its eval_pope.py, word for word) or tolerant (any case, any
    # whitespace).
    yes_no_parsing: Literal["llava", "tolerant"] = "llava"
    judge: JudgeConfig | None = None


class PreprocessJobConfig(StrictModel):
    """`jobs/preprocess.py`: LLaVA JSON + images -> tokenized Parquet shards."""

    stage: LlavaStage
    # The model whose tokenizer and image size the records are prepared for.
    model: ModelSpec
    data: DataConfig
    # Directory (local or s3://) for shards/, manifest.json and rejects.jsonl.
    output_path: str
    # Replace an existing output instead of refusing to touch it.
    overwrite: bool = False
    # Parquet shard size (a shard is the unit a training worker streams): about `shard_mb` of
    # images per file (~190 rows at 336 px), or exactly `rows_per_shard` rows when that is set.
    shard_mb: int = Field(64, gt=0)
    rows_per_shard: int | None = Field(None, gt=0)
    # Records per map_batches call.
    batch_size: int = Field(64, gt=0)
    # Preprocessing actors; None: as many as fit in the cluster's CPUs after one read and one
    # write task.
    num_workers: int | None = Field(None, gt=0)
    # CPUs reserved per actor, and per read/write task. Small read/write values keep those tasks
    # schedulable while the actors hold the rest (else reads wait forever for a free CPU).
    cpus_per_worker: float = Field(1.0, gt=0)
    read_cpus: float = Field(0.25, gt=0)
    storage: StorageConfig = StorageConfig()


class TrainJobConfig(StrictModel):
    """`jobs/pretrain.py` / `jobs/finetune.py`: one LLaVA stage."""

    name: str
    model: ModelSpec
    # Prepared shards (output of the preprocess job).
    prepared_data: str
    # Ray Train storage (checkpoints): local dir or s3://.
    storage_path: str
    # HF-format export of the trained model.
    output_path: str
    train: TrainConfig
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _llava_stage(self) -> "TrainJobConfig":
        if self.train.stage not in ("pretrain", "finetune"):
            raise ValueError(f"train.stage {self.train.stage!r}: a LLaVA training job is stage pretrain or finetune"
                             " (vision_tower and language_model are stage 0: jobs/pretrain_components.py)")
        return self


class EvalJobConfig(StrictModel):
    """`jobs/evaluate.py`: generate answers, score them, log to MLflow."""

    model: ModelSpec
    eval: EvalConfig
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()
