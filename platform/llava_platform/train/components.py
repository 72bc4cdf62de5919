"""Stage 0 of the embedded default: the pretrained parts LLaVA composes, made on the synthetic world.

LLaVA-1.5 starts from a pretrained CLIP ViT-L/14-336 and a pretrained Vicuna-7B. No machine here reaches
a model hub, so the embedded default makes small pretrained parts first, each on Ray Train + DeepSpeed
through the same worker loop as LLaVA's stages (only the objective differs, ``train/objectives.py``):

1. a tokenizer (byte-level BPE) trained on the world's text;
2. a CLIP-style vision tower (``CLIPModel`` contrastive loss, weighted, + a dense per-cell objective) -> a plain
   ``CLIPVisionModel`` directory with its image processor;
3. a small ``LlamaForCausalLM`` on the world's text -> a plain model directory with the tokenizer.

The LLaVA model is then built from the two directories by ``compose`` (``model build --vision-tower
DIR --llm DIR``), the path ``openai/clip-vit-large-patch14-336`` + ``lmsys/vicuna-7b-v1.5`` take.
Each part is cached: its directory records a fingerprint of the world and the settings it was made
from, and a later run with the same fingerprint keeps it.

    python jobs/pretrain_components.py --config jobs/configs/components_small.yaml
    llava-platform model pretrain-components --world data/synth --out models/components
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from llava_platform.config.components import ComponentRunConfig, ComponentsJobConfig
from llava_platform.errors import LlavaPlatformError
from llava_platform.locations import absolute_paths

INFO_FILE = "component_info.json"
# Bump when what a fingerprint covers changes meaning (objective, data layout).
FORMAT = "llava-platform/components-v1"
WORLD_FILES = ("scenes.jsonl", "pretrain.json", "instruct.json")


class ComponentsError(LlavaPlatformError):
    """Stage 0 cannot run: no synthetic world at the given path, or a run failed."""


@dataclass
class ComponentResult:
    component: str
    path: str
    reused: bool
    seconds: float
    mlflow_run_id: str | None
    steps: int
    final_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ComponentsResult:
    vision_tower: ComponentResult
    language_model: ComponentResult
    tokenizer: str
    tracking_uri: str


def world_fingerprint(world: str) -> str:
    """sha256 over the world's record files and every training image."""
    h = hashlib.sha256()
    for name in WORLD_FILES:
        h.update(name.encode())
        h.update(Path(world, name).read_bytes())
    for image in sorted(Path(world, "images").iterdir()):
        h.update(image.name.encode())
        h.update(image.read_bytes())
    return h.hexdigest()


def _fingerprint(*parts: str) -> str:
    return hashlib.sha256("\n".join((FORMAT, *parts)).encode()).hexdigest()


def _cached(path: str, key: str) -> dict | None:
    try:
        info = json.loads(Path(path, INFO_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return info if info.get("fingerprint") == key else None


def _write_info(path: str, info: dict) -> None:
    Path(path, INFO_FILE).write_text(json.dumps(info, indent=2))


def train_tokenizer(cfg: ComponentsJobConfig, out_dir: str, key: str):
    """The world's tokenizer (shared by the language model and the CLIP text tower), cached by ``key``."""
    from transformers import AutoTokenizer

    from llava_platform.data.components import world_corpus
    from llava_platform.model.tokenizer import train_bpe_tokenizer

    if cfg.reuse and _cached(out_dir, key):
        return AutoTokenizer.from_pretrained(out_dir)
    tokenizer = train_bpe_tokenizer(world_corpus(cfg.world), cfg.language_model.vocab_size)
    tokenizer.save_pretrained(out_dir)
    _write_info(out_dir, {"fingerprint": key})
    return tokenizer


def _run(cfg: ComponentsJobConfig, component: str, dataset, records: int, out_dir: str, key: str, uri: str,
         tokenizer_dir: str) -> ComponentResult:
    """One stage-0 training run (or the cached result of an identical one)."""
    from llava_platform.tracking.runs import spool_path
    from llava_platform.train.trainer import fit, start_run, steps_for_records
    from llava_platform.train.worker import WorkerArgs

    cached = _cached(out_dir, key) if cfg.reuse else None
    if cached:
        print(f"[components] {component}: reusing {out_dir} (same world and settings)")
        return ComponentResult(component, out_dir, True, 0.0, cached.get("mlflow_run_id"), cached.get("steps", 0),
                               cached.get("final_metrics", {}))
    train = cfg.vision_tower_train if component == "vision_tower" else cfg.language_model_train
    run = ComponentRunConfig(name=f"{cfg.name}-{component.replace('_', '-')}", component=component,
                             vision_tower=cfg.vision_tower, language_model=cfg.language_model, train=train,
                             seed=cfg.seed)
    t0 = time.time()
    total = steps_for_records(train, records)
    if total * train.global_batch_size > records:
        dataset = _materialized(dataset)
    run_id = start_run(cfg.tracking, uri, run, cfg.storage_path,
                       {"llava_platform.world": cfg.world, "llava_platform.fingerprint": key}, cfg.storage)
    fit(WorkerArgs(objective=component, job=run, run_name=run.name, total_steps=total, output_path=out_dir,
                   storage=cfg.storage, tracking_uri=uri, mlflow_run_id=run_id,
                   tracking_spool=spool_path(cfg.storage_path, run.name),
                   system_metrics_interval_s=cfg.tracking.system_metrics_interval_s, tokenizer_dir=tokenizer_dir),
        dataset, cfg.storage_path)
    seconds = round(time.time() - t0, 1)
    metrics = _final_metrics(uri, run_id)
    _write_info(out_dir, {"fingerprint": key, "component": component, "mlflow_run_id": run_id, "steps": total,
                          "seconds": seconds, "world": cfg.world, "final_metrics": metrics})
    return ComponentResult(component, out_dir, False, seconds, run_id, total, metrics)


def _materialized(dataset):
    """``dataset`` computed once, in its read order, and held in the object store: a run of more than
    one epoch then reads it back instead of decoding every image again each epoch. Stage 0's world is
    small (the tower's 10000 96-px images are 276 MB), and the tower runs ~19 epochs of it; the
    per-epoch decoding ran beside the training workers on the same cores and halved their samples/s
    while it ran (measured, issue 12)."""
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True
    try:
        return dataset.materialize()
    finally:
        options.preserve_order = before


def _final_metrics(uri: str, run_id: str) -> dict[str, float]:
    from llava_platform.tracking.runs import run_metrics

    return {k: round(v, 4) for k, v in run_metrics(uri, run_id).items()}


def pretrain_components(cfg: ComponentsJobConfig) -> ComponentsResult:
    """Make (or reuse) the tokenizer, the vision tower and the language model for ``cfg.world``
    (Ray must be initialised).

    Raises:
        ComponentsError: ``cfg.world`` is not a synthetic world.
        TrainingError: a run failed.
    """
    from llava_platform.data.components import language_dataset, language_documents, vision_dataset, vision_items
    from llava_platform.tracking.runs import resolve_tracking_uri, use_tracking_uri

    cfg = absolute_paths(cfg)
    missing = [f for f in WORLD_FILES if not Path(cfg.world, f).exists()]
    if missing:
        raise ComponentsError(f"{cfg.world} is not a synthetic world (no {', '.join(missing)}); write one with"
                              " `llava-platform data synth --out DIR`")
    uri = resolve_tracking_uri(cfg.tracking)
    use_tracking_uri(uri)
    world_key = world_fingerprint(cfg.world)
    out = Path(cfg.output_path)
    tok_dir, vt_dir, lm_dir = (str(out / d) for d in ("tokenizer", "vision_tower", "language_model"))
    for d in (tok_dir, vt_dir, lm_dir):
        os.makedirs(d, exist_ok=True)
    tok_key = _fingerprint(world_key, f"vocab={cfg.language_model.vocab_size}")
    tokenizer = train_tokenizer(cfg, tok_dir, tok_key)
    common = (world_key, tok_key, f"seed={cfg.seed}")
    vt_key = _fingerprint(*common, cfg.vision_tower.model_dump_json(), cfg.vision_tower_train.model_dump_json())
    lm_key = _fingerprint(*common, cfg.language_model.model_dump_json(), cfg.language_model_train.model_dump_json())
    vision = _run(cfg, "vision_tower", vision_dataset(cfg.world, cfg.vision_tower, tokenizer),
                  len(vision_items(cfg.world)), vt_dir, vt_key, uri, tok_dir)
    language = _run(cfg, "language_model", language_dataset(cfg.world, tokenizer, seed=cfg.seed),
                    len(language_documents(cfg.world)), lm_dir, lm_key, uri, tok_dir)
    return ComponentsResult(vision, language, tok_dir, uri)


def run_components(cfg: ComponentsJobConfig) -> ComponentsResult:
    """Entry points' library function: run and print where the parts are and how to compose them."""
    result = pretrain_components(cfg)
    for part in (result.vision_tower, result.language_model):
        how = "reused" if part.reused else f"{part.steps} steps in {part.seconds:.0f}s"
        print(f"[components] {part.component}: {part.path} ({how}; MLflow run {part.mlflow_run_id})")
    print("[components] compose a LLaVA from them (the path CLIP ViT-L/14-336 + Vicuna-7B take):\n"
          f"    llava-platform model build --vision-tower {result.vision_tower.path}"
          f" --llm {result.language_model.path} --out models/llava-init")
    return result
