"""The demo on the embedded default.

What runs today: synthesise the shape world -> build the ``small`` preset -> one optimizer step of
stage 1 (projector only) and one of stage 2 (projector + LLM) on real synthetic records -> save the
model in HF format. Preprocessing on Ray Data, training on Ray Train + DeepSpeed, evaluation and
serving are not wired into the demo yet; the demo says so at the end rather than pretend.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from llava_platform.data import synthetic
from llava_platform.data.conversation import chat_template  # noqa: F401  (template files must resolve)
from llava_platform.data.sample import LlavaCollator, SampleSpec, encode_record
from llava_platform.model.builder import apply_stage, build_preset, describe, save_model
from llava_platform.train.step import optimizer_step, trainable_parameters

STAGES = (("pretrain", "pretrain.json", "plain", 1e-3), ("finetune", "instruct.json", "llava_v1", 2e-5))


def run_demo(workdir: str | Path, n: int = 200, batch_size: int = 8) -> dict:
    """Run what exists of the demo and return its facts (also printed)."""
    t0 = time.time()
    work = Path(workdir)
    data_dir = work / "data"
    print(f"[demo] synthesising {n} scenes into {data_dir}")
    summary = synthetic.write_dataset(data_dir, n=n, seed=0)
    print(f"[demo] {json.dumps(summary.as_dict())}")
    model, processor = build_preset("small", seed=0)
    print(f"[demo] built the small preset: {json.dumps(describe(model))}")
    collate = LlavaCollator(processor.tokenizer.pad_token_id, processor.image_processor.image_mean,
                            processor.image_processor.image_std)
    facts: dict = {"synth": summary.as_dict()}
    for stage, fname, template, lr in STAGES:
        counts = apply_stage(model, stage)
        spec = SampleSpec.from_processor(processor, model.config, template, max_length=512)
        records = json.loads((data_dir / fname).read_text())[:batch_size]
        samples = [
            encode_record(r, (data_dir / "images" / r["image"]).read_bytes() if r.get("image") else None,
                          processor.tokenizer, spec)
            for r in records
        ]
        optimizer = torch.optim.AdamW(trainable_parameters(model), lr=lr, weight_decay=0.0)
        loss = optimizer_step(model, collate(samples), optimizer)
        print(f"[demo] stage {stage}: one optimizer step on {len(samples)} records, loss {loss:.4f},"
              f" trainable {counts['trainable']:,} of {counts['total']:,} parameters")
        facts[stage] = {"loss": loss, **counts}
    out = save_model(model, processor, str(work / "model"))
    print(f"[demo] saved the model (HF format) to {out}")
    print(f"[demo] done in {time.time() - t0:.1f}s.")
    print("[demo] NOT YET PART OF THE DEMO: Ray Data preprocessing, Ray Train + DeepSpeed training,"
          " MLflow tracking, evaluation, Ray Serve. This run only checks the model and data foundation.")
    return facts
