"""The demo on the embedded default: local Ray on CPU, SQLite-backed MLflow, local files.

Synthesise the shape world -> build the ``small`` preset -> preprocess both stages' data on Ray Data
-> stage 1 (projector) and stage 2 (projector + LLM, vision tower unfrozen: the preset's tower is
randomly initialised, not CLIP) on Ray Train + DeepSpeed with 2 workers -> evaluate on held-out scenes
with the blind baseline (Ray Data) -> deploy the Serve app -> one OpenAI-style request with a demo
image -> print the answer, the accuracy table, the MLflow store, the web chat page and how to stop.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from llava_platform.config import EvalJobConfig, PreprocessJobConfig, TrainJobConfig, load_config
from llava_platform.data import synthetic
from llava_platform.data.pipeline import prepare
from llava_platform.eval.evaluate import run_evaluation
from llava_platform.model.builder import build_preset, describe, save_model
from llava_platform.ray_utils import init_ray
from llava_platform.train.trainer import run_training

STAGES = (("pretrain", "pretrain.json", 1e-3), ("finetune", "instruct.json", 2e-4))


def run_demo(workdir: str | Path, n: int = 3000, preset: str = "small", steps: int = 30, finetune_steps: int | None = None,
             n_eval: int = 40, serve_port: int = 8000, wait: bool = True) -> dict:
    """Run the whole pipeline end to end and return its facts (also printed).

    Args:
        workdir: where data, models, runs, evaluation and the MLflow store go.
        n: synthetic training scenes.
        preset: model preset.
        steps: stage-1 optimizer steps; ``finetune_steps`` stage 2's (default: ``steps``).
        n_eval: held-out scenes (five questions each).
        serve_port: the Serve HTTP port on 127.0.0.1 (if Serve already runs, its port is used).
        wait: keep serving until Ctrl-C after the demo request.
    """
    t0 = time.time()
    work = Path(workdir).resolve()
    data_dir = work / "data"
    print(f"[demo] synthesising {n} scenes (+{n_eval} held out) into {data_dir}")
    summary = synthetic.write_dataset(data_dir, n=n, seed=0, n_eval=n_eval)
    model, processor = build_preset(preset, seed=0)
    init_dir = save_model(model, processor, str(work / "models" / "init"))
    print(f"[demo] built the {preset} preset: {json.dumps(describe(model)['params'])}")
    init_ray()
    facts: dict = {"synth": summary.as_dict(), "times": {}}
    source = f"model.checkpoint={init_dir}"
    db = work / "mlruns" / "mlflow.db"
    tracking = f"tracking.tracking_uri=sqlite:///{db}"
    for stage, fname, lr in STAGES:
        t = time.time()
        report = prepare(load_config(None, PreprocessJobConfig, [
            f"stage={stage}", source, f"data.data_path={data_dir / fname}", f"data.image_root={data_dir / 'images'}",
            f"output_path={work / 'prepared' / stage}", "overwrite=true", "num_workers=2", "cpus_per_worker=0.5",
            "data.max_length=512"]))
        print(report.table())
        n_steps = steps if stage == "pretrain" else (finetune_steps or steps)
        job = load_config(None, TrainJobConfig, [
            f"name=demo-{stage}", source, f"prepared_data={work / 'prepared' / stage}", f"storage_path={work / 'runs'}",
            f"output_path={work / 'models' / stage}", f"train.stage={stage}", "train.num_workers=2",
            "train.cpus_per_worker=0.5", "train.global_batch_size=16", "train.micro_batch_size=8", f"train.lr={lr}",
            f"train.max_steps={n_steps}", f"train.save_steps={n_steps}", "train.precision=fp32", "train.zero_stage=2",
            "train.warmup_ratio=0.03", "train.unfreeze_vision_tower=" + ("true" if stage == "finetune" else "false"),
            tracking, "tracking.experiment=demo", f"tracking.registered_model_name=llava-demo-{preset}"])
        result = run_training(job)
        facts[stage] = {"prepared": report.written, "rejected": report.rejected, "mlflow_run_id": result.mlflow_run_id,
                        "export": result.output_path, "steps": result.total_steps}
        facts["times"][stage] = round(time.time() - t, 1)
        source = f"model.checkpoint={result.output_path}"
    export = facts["finetune"]["export"]

    t = time.time()
    evaluation = run_evaluation(load_config(None, EvalJobConfig, [
        f"model.checkpoint={export}", f"eval.questions={data_dir / 'eval' / 'questions.jsonl'}",
        f"eval.image_root={data_dir / 'eval' / 'images'}", f"eval.answers_key={data_dir / 'eval' / 'answers_key.jsonl'}",
        f"eval.output_dir={work / 'eval'}", "eval.max_new_tokens=8", "eval.batch_size=32", "eval.cpus_per_actor=1",
        tracking, "tracking.experiment=demo"]))
    facts["times"]["evaluate"] = round(time.time() - t, 1)
    facts["eval"] = {"mlflow_run_id": evaluation.mlflow_run_id, **(evaluation.scores.metrics() if evaluation.scores else {})}

    t = time.time()
    url, app_name = _deploy(export, serve_port)
    facts["times"]["serve"] = round(time.time() - t, 1)
    question = json.loads((data_dir / "eval" / "questions.jsonl").read_text().splitlines()[0])
    expected = json.loads((data_dir / "eval" / "answers_key.jsonl").read_text().splitlines()[0])["answer"]
    image = data_dir / "eval" / "images" / question["image"]
    answer = _ask(url, image, question["text"])
    facts["request"] = {"question": question["text"], "answer": answer, "expected": expected}
    facts["chat_page"] = _check_chat_page(url)
    facts["seconds"] = round(time.time() - t0, 1)

    print(f"\n[demo] done in {facts['seconds']}s ({', '.join(f'{k} {v}s' for k, v in facts['times'].items())}).")
    print(f"[demo] OpenAI-style request to {url}/v1/chat/completions with {image}:")
    print(f"    Q: {question['text']!r}\n    A: {answer!r}   (expected: {expected!r})")
    print(f"[demo] held-out accuracy, model vs blind baseline (image withheld), {evaluation.answers} questions:")
    print(evaluation.scores.table() if evaluation.scores else "(no answer key)")
    print(f"[demo] chart and answers: {work / 'eval'}")
    print(f"[demo] stage-2 export (loads in plain transformers): {export}")
    print(f"[demo] MLflow store: {db}; open it with:\n    mlflow ui --backend-store-uri sqlite:///{db}")
    print(f"[demo] the OpenAI-compatible endpoint is {url}/v1 (model `llava`); try:\n"
          f"    llava-platform chat --endpoint {url} --image {image}")
    print(f"[demo] chat in your browser (drop in an image, ask, follow up): {facts['chat_page']}")
    facts["url"] = url
    if wait:
        print("[demo] serving until you press Ctrl-C; Ray and Serve stop with this process.", flush=True)
        # Ray Train installs its own SIGINT handler for a fit() and leaves it in place, which would
        # swallow Ctrl-C here (measured: the demo kept running); restore Python's default.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # let Ray's exit-time shutdown finish quietly
            print("\n[demo] stopped.")
    else:
        from ray import serve

        serve.delete(app_name)
        print("[demo] the Serve app was removed; Ray stops with this process.")
    return facts


def _deploy(export: str, port: int) -> tuple[str, str]:
    """Deploy the chat app on loopback (Serve is started here unless it already runs) -> its URL."""
    from ray import serve
    from ray.serve.context import _get_global_client

    from llava_platform.serve.app import LlavaAppArgs, build_app

    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    port = _get_global_client().http_config.port  # the running instance's, if it was already up
    small = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}}
    app = build_app(LlavaAppArgs(model=export, max_new_tokens_limit=256),
                    {"Gateway": small, "VisionEncoder": small, "LanguageModel": small})
    serve.run(app, name="demo", route_prefix="/demo")
    return f"http://127.0.0.1:{port}/demo", "demo"


def _check_chat_page(url: str) -> str:
    """The web chat page's URL, after checking that the Gateway serves it and its script."""
    import httpx

    page = f"{url}/"
    for address in (page, f"{url}/static/chat.js"):
        httpx.get(address, timeout=30).raise_for_status()
    return page


def _ask(url: str, image: Path, question: str) -> str:
    import base64

    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("LLAVA_API_KEY", "none"), timeout=120)
    data = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    res = client.chat.completions.create(model="llava", max_tokens=16, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data}}, {"type": "text", "text": question}]}])
    return res.choices[0].message.content or ""
