"""The demo on the embedded default: local Ray on CPU, SQLite-backed MLflow, local files.

What runs today: synthesise the shape world -> build the ``small`` preset -> preprocess both stages'
data on Ray Data -> stage 1 (projector) and stage 2 (projector + LLM) on Ray Train + DeepSpeed with
2 workers -> print the losses, the exports and how to open MLflow. Evaluation against the blind
baseline and serving are not built yet; the demo says so at the end rather than pretend.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from llava_platform.config import PreprocessJobConfig, TrainJobConfig, load_config
from llava_platform.data import synthetic
from llava_platform.data.pipeline import prepare
from llava_platform.model.builder import build_preset, describe, save_model
from llava_platform.ray_utils import init_ray
from llava_platform.train.trainer import run_training

STAGES = (("pretrain", "pretrain.json", 1e-3), ("finetune", "instruct.json", 2e-4))


def run_demo(workdir: str | Path, n: int = 400, preset: str = "small", steps: int = 30) -> dict:
    """Run what exists of the pipeline end to end and return its facts (also printed)."""
    t0 = time.time()
    work = Path(workdir).resolve()
    data_dir = work / "data"
    print(f"[demo] synthesising {n} scenes into {data_dir}")
    summary = synthetic.write_dataset(data_dir, n=n, seed=0)
    model, processor = build_preset(preset, seed=0)
    init_dir = save_model(model, processor, str(work / "models" / "init"))
    print(f"[demo] built the {preset} preset: {json.dumps(describe(model)['params'])}")
    init_ray()
    facts: dict = {"synth": summary.as_dict()}
    source = f"model.checkpoint={init_dir}"
    tracking = f"tracking.tracking_uri=sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    for stage, fname, lr in STAGES:
        report = prepare(load_config(None, PreprocessJobConfig, [
            f"stage={stage}", source, f"data.data_path={data_dir / fname}", f"data.image_root={data_dir / 'images'}",
            f"output_path={work / 'prepared' / stage}", "overwrite=true", "num_workers=2", "cpus_per_worker=0.5",
            "data.max_length=512"]))
        print(report.table())
        job = load_config(None, TrainJobConfig, [
            f"name=demo-{stage}", source, f"prepared_data={work / 'prepared' / stage}", f"storage_path={work / 'runs'}",
            f"output_path={work / 'models' / stage}", f"train.stage={stage}", "train.num_workers=2",
            "train.cpus_per_worker=0.5", "train.global_batch_size=16", "train.micro_batch_size=8", f"train.lr={lr}",
            f"train.max_steps={steps}", f"train.save_steps={steps}", "train.precision=fp32", "train.zero_stage=2",
            "train.warmup_ratio=0.03", tracking, "tracking.experiment=demo",
            f"tracking.registered_model_name=llava-demo-{preset}"])
        result = run_training(job)
        facts[stage] = {"prepared": report.written, "rejected": report.rejected, "mlflow_run_id": result.mlflow_run_id,
                        "export": result.output_path, "steps": result.total_steps}
        source = f"model.checkpoint={result.output_path}"
    facts["seconds"] = round(time.time() - t0, 1)
    db = work / "mlruns" / "mlflow.db"
    print(f"\n[demo] done in {facts['seconds']}s. Stage-1 export: {facts['pretrain']['export']}")
    print(f"[demo] stage-2 export (loads in plain transformers): {facts['finetune']['export']}")
    print(f"[demo] MLflow store: {db}; open it with:\n    mlflow ui --backend-store-uri sqlite:///{db}")
    print("[demo] Ray was started for this process and stops with it; nothing is left running.")
    print("[demo] NOT YET PART OF THE DEMO: evaluation against the blind baseline, Ray Serve and the chat page.")
    return facts
