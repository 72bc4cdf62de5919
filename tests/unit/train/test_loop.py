"""Both LLaVA stages on Ray Train + DeepSpeed with 2 CPU workers and the tiny model, on the session's
local Ray cluster: loss goes down, freezing holds bitwise, ZeRO-2 and ZeRO-3, MLflow lineage, LoRA,
and a node failure mid-run that resumes from the last checkpoint on exactly the same batches."""

import json
import math
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_platform.config import PreprocessJobConfig, TrainJobConfig, load_config
from llava_platform.preprocess import prepare
from llava_platform.model.presets import build_preset
from llava_platform.train.objectives import apply_lora
from llava_platform.train.trainer import TrainingError, run_training

pytestmark = pytest.mark.ray

STEPS = 8
# Stage-1 loss per step for the fixed seeds and data below (ZeRO-2, fp32, 2 workers); a regression
# guard with a tolerance, not a target. Re-pinned when the synthetic stage-2 mix gained VQA records
# (the generator's random stream, and so the pretrain captions of synth_dir, changed), and again when
# questions started naming each shape only by what is unique in its scene (same reason).
STAGE1_LOSS = [6.24822, 6.23688, 6.21067, 6.19644, 6.16836, 6.10579, 6.16248, 6.15800]


@pytest.fixture(scope="module")
def prepared(ray_cluster, synth_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    for stage, fname in (("pretrain", "pretrain.json"), ("finetune", "instruct.json")):
        prepare(load_config(None, PreprocessJobConfig, [
            f"stage={stage}", "model.preset=tiny", f"data.data_path={synth_dir / fname}",
            f"data.image_root={synth_dir / 'images'}", f"output_path={root / stage}", "num_workers=1",
            "cpus_per_worker=0.5", "data.max_length=256"]))
    return root


def job(root: Path, name: str, stage: str, data: Path, model: list[str], **extra) -> TrainJobConfig:
    sets = [f"name={name}", *model, f"prepared_data={data}", f"storage_path={root / 'runs'}",
            f"output_path={root / 'exports' / name}", f"train.stage={stage}", "train.num_workers=2",
            "train.global_batch_size=8", "train.micro_batch_size=2", "train.lr=5e-3", f"train.max_steps={STEPS}",
            "train.save_steps=2", "train.precision=fp32", "train.cpus_per_worker=1", "train.max_failures=0",
            f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}", "tracking.registered_model_name=llava-tiny",
            "tracking.experiment=tests"]
    sets += [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, TrainJobConfig, sets)


def loss_history(result):
    from mlflow.tracking import MlflowClient

    hist = MlflowClient(result.tracking_uri).get_metric_history(result.mlflow_run_id, "loss")
    by_step = {}
    for m in sorted(hist, key=lambda m: m.timestamp):
        by_step[m.step] = m.value  # after a retry, the last value for a step wins
    return [by_step[s] for s in sorted(by_step)]


def trace(trace_dir: Path) -> dict[int, list[str]]:
    """step -> sorted ids trained in it (both ranks); the last attempt wins."""
    steps: dict[int, dict[str, list[str]]] = {}
    for f in trace_dir.glob("rank*.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            steps.setdefault(rec["step"], {})[f.name] = rec["ids"]
    return {s: sorted(i for ids in v.values() for i in ids) for s, v in steps.items()}


@pytest.fixture(scope="module")
def stage1(prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("s1")
    (root / "trace").mkdir()
    # A peak of 1 GFLOP/s makes the loop report MFU on CPU; system metrics every second.
    j = job(root, "stage1", "pretrain", prepared / "pretrain", ["model.preset=tiny"],
            **{"train.zero_stage": 2, "train.peak_tflops": 0.001, "tracking.system_metrics_interval_s": 1})
    return root, j, run_training(j, trace_dir=str(root / "trace"))


@pytest.fixture(scope="module")
def stage2(prepared, stage1, tmp_path_factory):
    root = tmp_path_factory.mktemp("s2")
    _, j1, _ = stage1
    j = job(root, "stage2", "finetune", prepared / "finetune", [f"model.checkpoint={j1.output_path}"],
            **{"train.zero_stage": 3, "train.lr": 2e-3, "tracking.tracking_uri": j1.tracking.tracking_uri})
    return root, j, run_training(j)


def weights(path) -> dict[str, torch.Tensor]:
    """The exported model's parameters as plain transformers loads them (the file's own key names
    differ: transformers renames keys when it saves)."""
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path).state_dict()


def test_stage1_zero2_trains_only_the_projector(stage1):
    root, j, result = stage1
    losses = loss_history(result)
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.02, losses
    initial, _ = build_preset("tiny", seed=0)
    init = initial.state_dict()
    trained = weights(j.output_path)
    changed = {k for k, v in trained.items() if not torch.equal(v, init[k])}
    assert changed and all("multi_modal_projector" in k for k in changed), sorted(changed)[:5]
    assert {k for k in init if "multi_modal_projector" in k} == changed
    proj = load_file(str(Path(j.output_path) / "projector" / "projector.safetensors"))
    assert set(proj) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    assert torch.equal(proj["linear_1.weight"], trained["model.multi_modal_projector.linear_1.weight"])


def test_stage1_loss_regression(stage1):
    _, _, result = stage1
    losses = loss_history(result)
    assert losses == pytest.approx(STAGE1_LOSS, rel=1e-3), ", ".join(f"{x:.5f}" for x in losses)


def test_stage2_zero3_keeps_the_vision_tower(stage1, stage2):
    _, j1, r1 = stage1
    _, j2, r2 = stage2
    losses = loss_history(r2)
    assert len(losses) == STEPS and losses[-1] < losses[0], losses
    before, after = weights(j1.output_path), weights(j2.output_path)
    assert before.keys() == after.keys()
    for k in before:
        if k.startswith("model.vision_tower."):
            assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("model.language_model."))
    assert any(not torch.equal(before[k], after[k]) for k in before if "multi_modal_projector" in k)
    # The export prompts as it trained: the data's template (LLaVA-1.5's vicuna_v1) is its chat template.
    from transformers import AutoProcessor

    from llava_platform.data.conversation import chat_template

    assert AutoProcessor.from_pretrained(j2.output_path).chat_template == chat_template("vicuna_v1")
    assert json.loads((Path(j2.output_path) / "training_info.json").read_text())["template"] == "vicuna_v1"


def test_mlflow_lineage_and_registry(stage1, stage2):
    from mlflow.tracking import MlflowClient

    _, _, r1 = stage1
    _, j2, r2 = stage2
    client = MlflowClient(r1.tracking_uri)
    run2 = client.get_run(r2.mlflow_run_id)
    assert run2.data.tags["stage1_run_id"] == r1.mlflow_run_id
    assert run2.data.params["train.zero_stage"] == "3" and run2.data.params["train.stage"] == "finetune"
    assert run2.data.tags["sys.torch"] == torch.__version__ and int(run2.data.tags["sys.cluster_nodes"]) >= 1
    assert {"loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "step_time_s"} <= set(run2.data.metrics)
    assert "export/model.safetensors" in {a.path for a in client.list_artifacts(r2.mlflow_run_id, "export")}
    versions = {v.run_id: v for v in client.search_model_versions("name='llava-tiny'")}
    assert r1.mlflow_run_id in versions[r2.mlflow_run_id].description
    assert r2.mlflow_run_id in versions[r2.mlflow_run_id].description
    info = json.loads((Path(j2.output_path) / "training_info.json").read_text())
    assert info["parent_mlflow_run_id"] == r1.mlflow_run_id and info["steps"] == STEPS


def test_run_page_has_data_wait_mfu_system_metrics_and_a_summary(stage1, stage2):
    from mlflow.tracking import MlflowClient

    _, j1, r1 = stage1
    _, _, r2 = stage2
    client = MlflowClient(r1.tracking_uri)
    history = {key: sorted(client.get_metric_history(r1.mlflow_run_id, key), key=lambda m: m.step)
               for key in ("data_wait_s", "step_time_s", "tokens_per_s", "mfu")}
    assert [m.step for m in history["data_wait_s"]] == list(range(1, STEPS + 1))
    for wait, step in zip(history["data_wait_s"], history["step_time_s"]):
        assert 0 < wait.value < step.value
    # The tiny model on CPU against a made-up 1 GFLOP/s peak: any positive figure is plausible.
    assert len(history["mfu"]) == STEPS and all(0 < m.value < math.inf for m in history["mfu"]), history["mfu"]
    assert "mfu" not in client.get_run(r2.mlflow_run_id).data.metrics  # CPU, no peak given: no MFU

    # One monitor per node, on its first worker: this one-node cluster has node_0 only.
    system = {k for k in client.get_run(r1.mlflow_run_id).data.metrics if k.startswith("system/")}
    assert {"system/node_0/cpu_utilization_percentage", "system/node_0/system_memory_usage_megabytes"} <= system
    assert all(k.startswith("system/node_0/") for k in system), system

    experiment = client.get_run(r1.mlflow_run_id).info.experiment_id
    summary = client.load_table(experiment, "summary.json", run_ids=[r1.mlflow_run_id])
    row = summary.iloc[0]
    assert (row["steps"], row["samples"], row["steps_this_attempt"]) == (STEPS, STEPS * 8, STEPS)
    # Its figures are the steps' own, added up.
    tokens = sum(t.value * s.value for t, s in zip(history["tokens_per_s"], history["step_time_s"]))
    assert row["tokens"] == pytest.approx(tokens, rel=1e-3)
    assert row["train_time_s"] == pytest.approx(sum(s.value for s in history["step_time_s"]), abs=0.05)
    assert row["data_wait_s"] == pytest.approx(sum(w.value for w in history["data_wait_s"]), abs=0.05)
    assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["train_time_s"], rel=1e-2)


def test_lora_merge_equals_adapter_outputs():
    from llava_platform.config.schema import LoraConfig

    model, processor = build_preset("tiny", seed=0)
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # B starts at zero; make the adapter matter
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("multi_modal_projector" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    assert not any("lora" in n for n in trainable if "language_model" not in n)
    ids = torch.randint(5, 400, (2, 24))
    pixels = torch.randn(2, 3, 32, 32)
    ids[:, 1:17] = model.config.image_token_id
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids, pixel_values=pixels).logits
        merged = peft_model.merge_and_unload()
        got = merged(input_ids=ids, pixel_values=pixels).logits
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_lora_stage2_exports_a_merged_model(prepared, stage1, tmp_path):
    from transformers import AutoModelForImageTextToText

    _, j1, _ = stage1
    j = job(tmp_path, "lora", "finetune", prepared / "finetune", [f"model.checkpoint={j1.output_path}"],
            **{"train.zero_stage": 2, "train.max_steps": 2, "train.lora.r": 4, "train.lora.alpha": 8,
               "train.projector_lr": 1e-3})
    run_training(j)
    exported = weights(j.output_path)
    assert not any("lora" in k for k in exported)
    before = weights(j1.output_path)
    assert all(torch.equal(before[k], exported[k]) for k in before if k.startswith("model.vision_tower."))
    assert any(not torch.equal(before[k], exported[k]) for k in before if "q_proj" in k)
    AutoModelForImageTextToText.from_pretrained(j.output_path)  # plain transformers, no peft


def test_node_failure_resumes_from_checkpoint_on_the_same_batches(ray_cluster, prepared, stage1, tmp_path):
    """Two workers on two nodes; one node is removed mid-run. The run restarts from its last
    checkpoint, trains exactly the configured steps, each on the same ids as an uninterrupted run, and
    ends at the same weights. A re-run of the driver with the same name then resumes at the end
    instead of starting over."""
    ref_root, ref_job, _ = stage1
    nodes = [ray_cluster.add_node(num_cpus=1, resources={"trainslot": 1}) for _ in range(2)]
    ray_cluster.wait_for_nodes()
    (tmp_path / "trace").mkdir()
    j = job(tmp_path, "faulty", "pretrain", prepared / "pretrain", ["model.preset=tiny"],
            **{"train.zero_stage": 2, "train.max_failures": 1, "train.resources_per_worker": "{trainslot: 1}"})
    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = run_training(j, trace_dir=str(tmp_path / "trace"))
        except BaseException as e:  # noqa: BLE001  (reported by the assertion below)
            outcome["error"] = e

    thread = threading.Thread(target=fit)
    thread.start()
    deadline = time.time() + 300
    while time.time() < deadline and thread.is_alive() and max(trace(tmp_path / "trace") or [0]) < 3:
        time.sleep(0.05)
    removed_at = max(trace(tmp_path / "trace") or [0])
    ray_cluster.remove_node(nodes[0])
    replacement = ray_cluster.add_node(num_cpus=1, resources={"trainslot": 1})
    thread.join(timeout=600)
    try:
        assert "error" not in outcome, outcome.get("error")
        assert 3 <= removed_at < STEPS, f"the node was removed at step {removed_at}"
        ours, reference = trace(tmp_path / "trace"), trace(ref_root / "trace")
        assert sorted(ours) == list(range(1, STEPS + 1))
        assert ours == reference  # every step, after the restart too, trained the same ids
        a, b = weights(j.output_path), weights(ref_job.output_path)
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)
        first = outcome["result"]
        run_dir = Path(j.storage_path) / j.name
        registered = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
        assert registered, "no checkpoint was kept"
        # what a node lost (or a disk filled) during an upload leaves: a newer folder with a truncated
        # shard and no state; the re-run must neither resume from it nor keep it
        partial = run_dir / "checkpoint_9999-12-31_23-59-59.999999"
        shutil.copytree(registered[-1], partial)
        for f in partial.rglob("*"):
            if f.is_file():
                f.write_bytes(f.read_bytes()[:7])
        (partial / "train_state.json").unlink(missing_ok=True)
        lines_before = sum(1 for f in (tmp_path / "trace").glob("*.jsonl") for _ in f.open())
        again = run_training(j, trace_dir=str(tmp_path / "trace"))
        lines_after = sum(1 for f in (tmp_path / "trace").glob("*.jsonl") for _ in f.open())
        assert lines_after == lines_before  # resumed at the end: no step trained again
        assert again.mlflow_run_id == first.mlflow_run_id  # one MLflow run across retries and re-runs
        assert not partial.exists() and all(p.exists() for p in registered)
    finally:
        for node in (nodes[1], replacement):
            ray_cluster.remove_node(node)


def test_against_a_real_mlflow_server(mlflow_server, prepared, tmp_path):
    """Tracking to an `mlflow server` on 127.0.0.1; stage 2 starts from an MLflow URI of stage 1."""
    from mlflow.tracking import MlflowClient

    short = {"train.max_steps": 2, "train.zero_stage": 2, "tracking.tracking_uri": mlflow_server,
             "tracking.registered_model_name": "llava-server", "tracking.experiment": "server"}
    r1 = run_training(job(tmp_path, "srv1", "pretrain", prepared / "pretrain", ["model.preset=tiny"], **short))
    r2 = run_training(job(tmp_path, "srv2", "finetune", prepared / "finetune",
                          [f"model.checkpoint=runs:/{r1.mlflow_run_id}/export"], **short))
    client = MlflowClient(mlflow_server)
    assert client.get_run(r2.mlflow_run_id).data.tags["stage1_run_id"] == r1.mlflow_run_id
    assert len(client.get_metric_history(r1.mlflow_run_id, "loss")) == 2
    versions = sorted(client.search_model_versions("name='llava-server'"), key=lambda v: int(v.version))
    assert [v.run_id for v in versions] == [r1.mlflow_run_id, r2.mlflow_run_id]
    runs = client.search_runs([client.get_experiment_by_name("server").experiment_id])
    assert len(runs) == 2  # one MLflow run per training run


def test_a_tracking_server_that_dies_mid_run_costs_no_training_and_is_caught_up_later(mlflow_process, prepared,
                                                                                       tmp_path):
    """Measured before: an MLflow server that died mid-run failed the run after 642 s, with no
    export, and left the MLflow run RUNNING. Now the run trains to the end and writes its export; what
    the server missed is kept in the spool, and a re-run of the same name once the server is back
    replays it, logs the export and registers it."""
    from mlflow.tracking import MlflowClient

    from llava_platform.tracking.runs import spool_path

    start_mlflow_server, stop_process = mlflow_process
    server_root = tmp_path / "server"
    server_root.mkdir()
    proc, log, url = start_mlflow_server(server_root)
    port = int(url.rsplit(":", 1)[1])
    j = job(tmp_path, "dying", "pretrain", prepared / "pretrain", ["model.preset=tiny"],
            **{"train.zero_stage": 2, "tracking.tracking_uri": url, "tracking.experiment": "dying",
               "tracking.registered_model_name": "llava-dying", "tracking.system_metrics_interval_s": 1})
    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = run_training(j)
        except BaseException as e:  # noqa: BLE001  (reported by the assertion below)
            outcome["error"] = e

    client = MlflowClient(url)
    thread = threading.Thread(target=fit)
    thread.start()
    logged: list = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and thread.is_alive() and len(logged) < 2:
            exp = client.get_experiment_by_name("dying")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            logged = client.get_metric_history(runs[0].info.run_id, "loss") if runs else []
            time.sleep(0.2)
    finally:
        stop_process(proc, log)  # the server dies after step 2
    died_at = max(m.step for m in logged)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    assert 2 <= died_at < STEPS, f"the server died at step {died_at}"
    result = outcome["result"]
    assert result.total_steps == STEPS and (Path(j.output_path) / "model.safetensors").exists()
    spool = spool_path(j.storage_path, "dying")
    kept = json.loads(Path(spool).read_text())
    assert kept["status"] == "FINISHED" and kept["tags"]["last_checkpoint_step"] == str(STEPS)
    spooled = sorted(s for k, _, _, s in kept["metrics"] if k == "loss")
    # what reached the server before it went down (it may have taken a step or two after the last
    # poll) plus what the spool kept is every step, once
    assert spooled and spooled[0] > died_at and spooled == list(range(spooled[0], STEPS + 1)), spooled

    proc, log, _ = start_mlflow_server(server_root, port)  # back, with the same store
    try:
        before = sorted(m.step for m in client.get_metric_history(result.mlflow_run_id, "loss"))
        assert before == list(range(1, spooled[0])), before
        again = run_training(j)  # resumes at the end: replays the spool, logs and registers the export
        assert again.mlflow_run_id == result.mlflow_run_id and not Path(spool).exists()
        assert sorted(m.step for m in client.get_metric_history(result.mlflow_run_id, "loss")) == list(
            range(1, STEPS + 1))
        run = client.get_run(result.mlflow_run_id)
        assert run.info.status == "FINISHED" and run.data.tags["registered_model_version"] == "llava-dying/1"
        assert any(f.path == "export" for f in client.list_artifacts(result.mlflow_run_id))
    finally:
        stop_process(proc, log)


def test_unknown_mlflow_model_uri_is_a_clear_error(mlflow_server, prepared, tmp_path):
    from llava_platform.errors import ModelBuildError

    j = job(tmp_path, "bad", "finetune", prepared / "finetune", ["model.checkpoint=runs:/0123456789abcdef/export"],
            **{"tracking.tracking_uri": mlflow_server})
    with pytest.raises(ModelBuildError, match="cannot download runs:/0123456789abcdef/export from MLflow"):
        run_training(j)


def test_text_only_micro_batches_with_an_unfrozen_vision_tower(ray_cluster, tmp_path):
    """Half the records have no image, so whole micro-batches are text-only on one rank while the
    other rank has images. Before the zero-weighted vision term, DeepSpeed reduced different
    gradient sets on the two ranks and gloo aborted the worker (seen in `make demo` at step 182)."""
    from llava_platform.data.synthetic import write_dataset

    data = tmp_path / "synth"
    write_dataset(data, n=8, seed=5, n_eval=1, text_only_fraction=1.0)
    prepare(load_config(None, PreprocessJobConfig, [
        "stage=finetune", "model.preset=tiny", f"data.data_path={data / 'instruct.json'}",
        f"data.image_root={data / 'images'}", f"output_path={tmp_path / 'prepared'}", "num_workers=1",
        "cpus_per_worker=0.5", "data.max_length=256"]))
    j = job(tmp_path, "textonly", "finetune", tmp_path / "prepared", ["model.preset=tiny"],
            **{"train.zero_stage": 2, "train.unfreeze_vision_tower": "true", "train.max_steps": 4,
               "train.save_steps": 4})
    result = run_training(j)
    assert result.total_steps == 4
    assert all(math.isfinite(v) for v in loss_history(result))


def test_unwritable_outputs_are_refused_before_any_work(tmp_path):
    """Measured before: a read-only storage_path ended in an OSError traceback, and output_path was
    only tried after the last step. (As root, a file in the way stands for a read-only folder.)"""
    from llava_platform.errors import StorageError

    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    for key in ("storage_path", "output_path"):
        j = job(tmp_path, "ro", "pretrain", tmp_path / "absent-data", ["model.preset=tiny"],
                **{key: str(blocker / "sub")})
        with pytest.raises(StorageError, match=f"{key} {blocker / 'sub'} is not writable"):
            run_training(j)
    assert not list(blocker.parent.glob("runs/**/.write-check-*"))  # the probes are removed


def test_a_failed_run_is_marked_failed_in_mlflow_with_its_reason(prepared, tmp_path):
    """Measured before: runs that failed were left RUNNING in MLflow."""
    from mlflow.tracking import MlflowClient

    j = job(tmp_path, "doomed", "pretrain", prepared / "pretrain", ["model.preset=tiny"],
            **{"train.zero_stage": 2, "train.max_steps": 2})
    with pytest.raises(TrainingError):
        run_training(j, deepspeed_overrides={"train_batch_size": 7})  # not micro x accumulation x workers
    client = MlflowClient(j.tracking.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                                filter_string="tags.`llava_platform.run_name` = 'doomed'")
    assert run.info.status == "FAILED"
    assert "TrainingError" in run.data.tags["llava_platform.failure"]


CONFIGS = Path(__file__).resolve().parents[3] / "jobs" / "configs"


def test_tf32_is_set_on_cuda_only(monkeypatch):
    # LLaVA-1.5's scripts pass --tf32 True: HF's Trainer then lets CUDA matmuls and cuDNN use TF32.
    from llava_platform.train.loop import set_tf32

    for name in ("pretrain_7b", "finetune_7b", "finetune_lora_7b"):  # on in the 7B configs, off by default
        assert load_config(CONFIGS / f"{name}.yaml", TrainJobConfig).train.tf32 is True
    assert load_config(CONFIGS / "pretrain_smoke.yaml", TrainJobConfig).train.tf32 is False
    def state():
        return (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
                torch.backends.cudnn.rnn.fp32_precision)

    before = state()
    if not torch.cuda.is_available():
        assert set_tf32(True) is False and state() == before
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        assert set_tf32(False) is False and state() == before  # off: torch's defaults stay
        assert set_tf32(True) is True and state() == ("tf32", "tf32", "tf32")
    finally:
        torch.backends.cuda.matmul.fp32_precision = before[0]
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision = before[1:]


def test_worker_silences_only_the_notices_a_user_cannot_act_on():
    import logging
    import warnings

    from llava_platform.train.loop import _quiet_third_party_notices

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _quiet_third_party_notices()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("`something_else` is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["`something_else` is deprecated"]
    monitor = logging.getLogger("mlflow.system_metrics.system_metrics_monitor")
    assert not monitor.isEnabledFor(logging.INFO) and monitor.isEnabledFor(logging.WARNING)
