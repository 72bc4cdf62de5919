import json
import subprocess
import sys
from pathlib import Path

import torch

from llava_platform.cli import main


def test_synth_and_build(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--n", "5", "--n-eval", "2", "--seed", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pretrain_records"] == 5 and (tmp_path / "d" / "eval" / "questions.jsonl").exists()
    assert main(["model", "build", "--preset", "tiny", "--out", str(tmp_path / "m")]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["image_tokens"] == 16
    from transformers import AutoModelForImageTextToText

    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "m").config.image_token_id == 4


def test_user_errors_exit_2_with_one_message(tmp_path, capsys):
    assert main(["model", "build", "--preset", "huge", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llava-platform: error: invalid config") and "'tiny' or 'small'" in err
    assert "Traceback" not in err
    assert main(["model", "build", "--vision-tower", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "needs both `vision_tower` and `llm`" in capsys.readouterr().err
    assert main(["model", "build", "--checkpoint", str(tmp_path / "absent"), "--out", str(tmp_path / "m")]) == 2
    assert "cannot load a LLaVA checkpoint" in capsys.readouterr().err


def test_console_script_is_installed():
    # pip puts console scripts beside the interpreter (the venv's bin/), activated or not.
    exe = Path(sys.executable).parent / "llava-platform"
    assert exe.is_file(), f"the llava-platform console script is not installed in {exe.parent}"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "data" in out.stdout and "model" in out.stdout


def test_eval_flags_map_to_config_keys_and_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", "--questions", str(tmp_path / "q.jsonl"), "--out", "o", "--model", "m"]) == 2
    assert "missing required key `eval.image_root`" in capsys.readouterr().err
    assert main(["eval", "--questions", str(tmp_path / "q.jsonl"), "--image-root", "i", "--out", "o",
                 "--model", "m", "--no-blind", "--set", "eval.batch_size=4"]) == 2
    err = capsys.readouterr().err
    assert "cannot read the question file" in err and "q.jsonl" in err and "Traceback" not in err


def test_config_flags_become_overrides_and_set_comes_last():
    from llava_platform.cli import _overrides, build_parser

    args = build_parser().parse_args(["data", "prepare", "--data", "d.json", "--stage", "finetune", "--overwrite",
                                      "--set", "stage=pretrain"])
    assert _overrides(args) == ["data.data_path=d.json", "stage=finetune", "overwrite=true", "stage=pretrain"]
    args = build_parser().parse_args(["model", "pretrain-components", "--world", "w", "--no-reuse"])
    assert _overrides(args) == ["world=w", "reuse=false"]
    args = build_parser().parse_args(["eval", "--model", "m", "--no-blind"])
    assert _overrides(args) == ["model.checkpoint=m", "eval.blind_baseline=false"]
    assert _overrides(build_parser().parse_args(["eval"])) == []


def test_model_export_to_the_original_layout_and_import_back(tmp_path, capsys):
    from transformers import LlavaForConditionalGeneration

    assert main(["model", "build", "--preset", "tiny", "--out", str(tmp_path / "m")]) == 0
    assert main(["model", "export", "--checkpoint", str(tmp_path / "m"), "--format", "llava-original",
                 "--out", str(tmp_path / "orig")]) == 0
    assert json.loads((tmp_path / "orig" / "config.json").read_text())["model_type"] == "llava_llama"
    assert main(["model", "import", "--llava", str(tmp_path / "orig"), "--out", str(tmp_path / "back")]) == 0
    a = LlavaForConditionalGeneration.from_pretrained(tmp_path / "m").state_dict()
    b = LlavaForConditionalGeneration.from_pretrained(tmp_path / "back").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(["model", "import", "--projector", str(tmp_path / "x.bin"), "--out", str(tmp_path / "y")]) == 2
    assert "--projector needs --vision-tower and --llm" in capsys.readouterr().err


def test_the_demo_command_runs_what_run_demo_runs_by_default():
    import inspect

    from llava_platform.cli import build_parser
    from llava_platform.demo import run_demo

    args = vars(build_parser().parse_args(["demo"]))
    defaults = {k: p.default for k, p in inspect.signature(run_demo).parameters.items()
                if p.default is not inspect.Parameter.empty}
    shared = {"n", "n_eval", "steps", "finetune_steps", "tower_steps", "lm_steps"}
    assert {k: args[k] for k in shared} == {k: defaults[k] for k in shared}
