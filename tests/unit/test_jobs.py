import importlib.util
import json
from pathlib import Path

import pytest

from llava_platform.config import PreprocessJobConfig
from llava_platform.jobs import job_main

REPO = Path(__file__).resolve().parents[2]


def load_job(name):
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bad_config_is_one_message_and_status_2(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stage: finetune\nmodel: {preset: tiny}\ndata: {data_path: x}\noutput_pth: y\n")
    ran = []
    assert job_main("doc", PreprocessJobConfig, ran.append, ["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown key `output_pth`; did you mean `output_path`?" in err and not ran


@pytest.mark.ray
def test_preprocess_job_runs_its_smoke_config(ray_cluster, synth_dir, tmp_path, capsys):
    job = load_job("preprocess")
    status = job_main(job.__doc__, PreprocessJobConfig, job.run_prepare, [
        "--config", str(REPO / "jobs" / "configs" / "preprocess_mix665k_smoke.yaml"),
        "--set", f"data.data_path={synth_dir / 'instruct.json'}",
        "--set", f"data.image_root={synth_dir / 'images'}",
        "--set", f"output_path={tmp_path / 'out'}",
    ])
    assert status == 0
    assert "preprocessing summary" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["records_in"] == manifest["written"] + manifest["rejected"] and manifest["written"] > 40


@pytest.mark.ray
def test_cli_prepare_flags_equal_config(ray_cluster, synth_dir, tmp_path, capsys):
    from llava_platform.cli import main

    assert main(["data", "prepare", "--data", str(synth_dir / "pretrain.json"), "--image-root",
                 str(synth_dir / "images"), "--preset", "tiny", "--stage", "pretrain", "--out",
                 str(tmp_path / "p"), "--set", "num_workers=1", "--set", "cpus_per_worker=0.5"]) == 0
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["template"] == "plain" and manifest["written"] == 40
    assert manifest["config"]["data"]["data_path"] == str(synth_dir / "pretrain.json")
