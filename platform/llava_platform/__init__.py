"""llava-platform: two-stage LLaVA training on Ray Train + DeepSpeed, MLflow tracking, Ray Serve."""

__version__ = "0.1.0"
