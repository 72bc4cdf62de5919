"""The ``llava-platform`` command.

    llava-platform data synth --out data/synth --n 1000 --seed 0
    llava-platform data prepare --data data/synth/instruct.json --image-root data/synth/images \
        --preset tiny --stage finetune --out data/prepared/finetune
    llava-platform model build --preset tiny --out models/tiny
    llava-platform model pretrain-components --config jobs/configs/components_small.yaml --world data/synth
    llava-platform model build --vision-tower openai/clip-vit-large-patch14-336 --llm lmsys/vicuna-7b-v1.5 --out s3://bucket/llava-init
    llava-platform demo

Errors caused by the user (bad config, missing files, unknown preset) print one clear message and
exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from llava_platform.errors import LlavaPlatformError


# A config-driven command: ``--config YAML``, flags that are shorthands for config keys, ``--set KEY=VALUE``.
# A flag's key ``name=value`` makes it a switch that sets that value.
ConfigFlag = tuple[str, str, str]  # (flag, config key, help)


def _config_command(sub: argparse._SubParsersAction, name: str, func, config_help: str, flags: Sequence[ConfigFlag],
                    **parser_kwargs) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, **parser_kwargs)
    parser.add_argument("--config", help=config_help)
    keys = {}
    for flag, key, help_ in flags:
        action = parser.add_argument(flag, help=help_, **({"action": "store_true"} if "=" in key else {}))
        keys[action.dest] = key
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config key")
    parser.set_defaults(func=func, config_keys=keys)
    return parser


def _overrides(args: argparse.Namespace) -> list[str]:
    """The given flags as ``key=value`` overrides, then the ``--set`` ones (which win)."""
    out = []
    for dest, key in args.config_keys.items():
        value = getattr(args, dest)
        if value not in (None, False):
            out.append(key if "=" in key else f"{key}={value}")
    return out + list(args.set)


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="datasets: synthesise the shape world")
    dsub = data.add_subparsers(dest="data_cmd", required=True)
    synth = dsub.add_parser("synth", help="write the synthetic shape world in LLaVA formats")
    synth.add_argument("--out", required=True, help="output directory (images/, pretrain.json, instruct.json, eval/)")
    synth.add_argument("--n", type=int, default=1000, help="training scenes, one image each (default 1000)")
    synth.add_argument("--n-eval", type=int, default=None, help="held-out eval scenes (default max(20, n/10))")
    synth.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    synth.set_defaults(func=_cmd_synth)
    _config_command(dsub, "prepare", _cmd_prepare, "a preprocess YAML (jobs/configs/preprocess_*.yaml); flags override it", (
        ("--data", "data.data_path", "LLaVA JSON array or JSONL, local or s3:// (data.data_path)"),
        ("--image-root", "data.image_root", "folder the records' image paths are relative to (data.image_root)"),
        ("--model", "model.checkpoint", "model directory or s3:// URI whose tokenizer/image size to use (model.checkpoint)"),
        ("--preset", "model.preset", "or a preset model: tiny or small (model.preset)"),
        ("--stage", "stage", "pretrain (template plain) or finetune (template vicuna_v1)"),
        ("--out", "output_path", "output directory, local or s3:// (output_path)"),
        ("--overwrite", "overwrite=true", "replace an existing output (overwrite)"),
    ), help="LLaVA JSON + images -> tokenized Parquet shards (Ray Data)",
        description="Flags are shorthands for config keys; --config and --set take the rest.")


def _add_model(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="build, inspect and save LLaVA models")
    msub = model.add_subparsers(dest="model_cmd", required=True)
    build = msub.add_parser("build", help="build a LLaVA model and write it in HF format")
    src = build.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="tiny (tests) or small: random weights, built from config, tokenizer trained locally")
    src.add_argument("--checkpoint", help="an existing LLaVA checkpoint in HF format (path or s3://)")
    src.add_argument("--vision-tower", help="CLIP vision tower: hub id, path or s3:// URI (use with --llm)")
    build.add_argument("--llm", help="causal LM (llama family): hub id, path or s3:// URI")
    build.add_argument("--tokenizer", help="tokenizer source when not beside the LLM")
    build.add_argument("--projector-type", default="mlp2x_gelu", help="mlp2x_gelu (LLaVA-1.5) or linear (LLaVA-1.0)")
    build.add_argument("--vision-feature-layer", type=int, default=-2, help="CLIP layer to take features from (default -2)")
    build.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    build.add_argument("--seed", type=int, default=0, help="seed for random initialisation (default 0)")
    build.add_argument("--out", required=True, help="output directory or s3:// URI")
    build.set_defaults(func=_cmd_model_build)
    imp = msub.add_parser("import", help="an original LLaVA checkpoint (LlavaLlamaForCausalLM) or stage 1's "
                                         "mm_projector.bin -> our (llava-hf) layout")
    isrc = imp.add_mutually_exclusive_group(required=True)
    isrc.add_argument("--llava", help="an original-layout checkpoint directory (path or s3://)")
    isrc.add_argument("--projector", help="stage 1's mm_projector.bin (use with --vision-tower and --llm)")
    imp.add_argument("--vision-tower", help="CLIP tower (hub id, path, s3://); overrides the checkpoint's mm_vision_tower")
    imp.add_argument("--llm", help="with --projector: the causal LM the projector was trained for")
    imp.add_argument("--projector-type", default="mlp2x_gelu", help="with --projector: mlp2x_gelu or linear")
    imp.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    imp.add_argument("--out", required=True, help="output directory or s3:// URI")
    imp.set_defaults(func=_cmd_model_import)
    exp = msub.add_parser("export", help="a LLaVA checkpoint -> llava-hf's or the original LLaVA code's layout")
    exp.add_argument("--checkpoint", required=True, help="a checkpoint: path, s3://, models:/ or runs:/")
    exp.add_argument("--format", required=True, choices=("llava-hf", "llava-original"))
    exp.add_argument("--vision-tower", help="llava-original: what mm_vision_tower names (e.g. the tower's hub id); "
                                            "default: the tower written beside it")
    exp.add_argument("--image-aspect-ratio", default="pad", choices=("pad", "square"),
                     help="llava-original: what the model trained with (LLaVA-1.5 stage 2: pad)")
    exp.add_argument("--out", required=True, help="output directory (s3:// for llava-hf)")
    exp.set_defaults(func=_cmd_model_export)
    _config_command(msub, "pretrain-components", _cmd_model_components,
                    "a components YAML (jobs/configs/components_*.yaml); flags override it", (
                        ("--world", "world", "a world from `data synth` (world)"),
                        ("--out", "output_path", "where tokenizer/, vision_tower/ and language_model/ go (output_path)"),
                        ("--runs", "storage_path", "Ray Train checkpoints (storage_path)"),
                        ("--no-reuse", "reuse=false", "train again even when the outputs match (reuse=false)"),
                    ), help="stage 0 of the embedded default: a small CLIP-style tower and LLM on a synthetic world")


def _cmd_synth(args: argparse.Namespace) -> int:
    from llava_platform.data.synthetic import write_dataset

    summary = write_dataset(args.out, n=args.n, seed=args.seed, n_eval=args.n_eval)
    print(json.dumps(summary.as_dict(), indent=2))
    return 0


def _ray_job(args: argparse.Namespace, config_class, run) -> int:
    """A config-driven command's job: its config from ``--config`` and the flags, then ``run`` on Ray."""
    from llava_platform.config.loader import load_config
    from llava_platform.ray_utils import init_ray

    cfg = load_config(args.config, config_class, _overrides(args))
    init_ray()
    run(cfg)
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from llava_platform.config.schema import PreprocessJobConfig
    from llava_platform.preprocess import run_prepare

    return _ray_job(args, PreprocessJobConfig, run_prepare)


def _cmd_model_build(args: argparse.Namespace) -> int:
    from llava_platform.config.loader import validate
    from llava_platform.config.schema import ModelSpec
    from llava_platform.model.builder import build_model, describe, save_model

    fields = {
        "preset": args.preset,
        "checkpoint": args.checkpoint,
        "vision_tower": args.vision_tower,
        "llm": args.llm,
        "tokenizer": args.tokenizer,
        "projector_type": args.projector_type,
        "vision_feature_layer": args.vision_feature_layer,
        "dtype": args.dtype,
        "seed": args.seed,
    }
    spec = validate(ModelSpec, {k: v for k, v in fields.items() if v is not None}, "command-line flags")
    model, processor = build_model(spec)
    where = save_model(model, processor, args.out)
    print(json.dumps({"saved": where, **describe(model)}, indent=2))
    return 0


def _cmd_model_import(args: argparse.Namespace) -> int:
    from llava_platform.errors import ModelBuildError
    from llava_platform.model.builder import describe, save_model
    from llava_platform.model.original import import_original, import_projector

    if args.projector and not (args.vision_tower and args.llm):
        raise ModelBuildError("--projector needs --vision-tower and --llm (the parts it was trained between)")
    if args.llava:
        model, processor = import_original(args.llava, args.vision_tower, dtype=args.dtype)
    else:
        model, processor = import_projector(args.projector, args.vision_tower, args.llm, args.projector_type,
                                            dtype=args.dtype)
    where = save_model(model, processor, args.out)
    print(json.dumps({"saved": where, **describe(model)}, indent=2))
    return 0


def _cmd_model_export(args: argparse.Namespace) -> int:
    from llava_platform import storage
    from llava_platform.errors import ModelBuildError
    from llava_platform.model.builder import load_checkpoint, save_model
    from llava_platform.model.original import export_original

    if args.format == "llava-original" and storage.is_remote(args.out):
        raise ModelBuildError("--format llava-original writes a local directory; copy it to S3 afterwards")
    model, processor = load_checkpoint(args.checkpoint)
    if args.format == "llava-hf":
        where = save_model(model, processor, args.out)
    else:
        local = args.checkpoint if os.path.isdir(args.checkpoint) else None  # for its tokenizer.model, if any
        where = export_original(model, processor, storage.strip_scheme(args.out), args.vision_tower,
                                args.image_aspect_ratio, tokenizer_source=local)
    print(json.dumps({"saved": where, "format": args.format}, indent=2))
    return 0


def _cmd_model_components(args: argparse.Namespace) -> int:
    from llava_platform.config.components import ComponentsJobConfig
    from llava_platform.train.components import run_components

    return _ray_job(args, ComponentsJobConfig, run_components)


def _cmd_demo(args: argparse.Namespace) -> int:
    from llava_platform.demo import run_demo

    run_demo(args.workdir, n=args.n, steps=args.steps, finetune_steps=args.finetune_steps,
             tower_steps=args.tower_steps, lm_steps=args.lm_steps, n_eval=args.n_eval, components=args.component,
             serve_port=args.port, wait=not args.no_wait)
    return 0


def _add_chat(sub: argparse._SubParsersAction) -> None:
    chat = sub.add_parser("chat", help="chat about an image in the terminal (a Serve endpoint or a local model)",
                          description="Interactive, streaming chat. The image goes with the first question; an "
                                      "empty line or `exit` ends it.")
    where = chat.add_mutually_exclusive_group(required=True)
    where.add_argument("--endpoint", help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000")
    where.add_argument("--model", help="a model to run in this process: local dir, s3://, models:/name/version")
    chat.add_argument("--image", help="image file to ask about")
    chat.add_argument("--model-name", help="with --endpoint: the served model name (default: the first listed)")
    chat.add_argument("--api-key", help="with --endpoint: bearer key (default: $LLAVA_API_KEY)")
    chat.add_argument("--max-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    chat.add_argument("--temperature", type=float, default=0.2, help="0 is greedy (default 0.2)")
    chat.set_defaults(func=_cmd_chat)


def _cmd_chat(args: argparse.Namespace) -> int:
    from llava_platform.serve.chat import EndpointBackend, LocalBackend, chat_loop, image_part

    if args.image:
        image_part(args.image)  # a wrong path fails before a model loads
    if args.endpoint:
        backend = EndpointBackend(args.endpoint, args.model_name, args.api_key)
    else:
        backend = LocalBackend(args.model)
    chat_loop(backend, args.image, max_tokens=args.max_tokens, temperature=args.temperature)
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    _config_command(sub, "eval", _cmd_eval, "YAML config (jobs/configs/evaluate_*.yaml)", (
        ("--model", "model.checkpoint", "model to evaluate: local dir, s3://, models:/name/version, runs:/id/export"),
        ("--questions", "eval.questions", "model_vqa question file (JSONL: question_id, image, text, category)"),
        ("--image-root", "eval.image_root", "directory (or s3:// prefix) the questions' images are in"),
        ("--answers-key", "eval.answers_key", "JSONL of {question_id, answer, category} to score against"),
        ("--out", "eval.output_dir", "output directory for answers, scores and the chart"),
        ("--no-blind", "eval.blind_baseline=false", "skip the blind (image withheld) baseline"),
    ), help="evaluate a model on a model_vqa question file (Ray Data, scores, blind baseline)",
        description="Flags and config keys are equivalent; --set reaches any other key.")


def _cmd_eval(args: argparse.Namespace) -> int:
    from llava_platform.config import EvalJobConfig, load_config
    from llava_platform.eval.evaluate import run_evaluation

    run_evaluation(load_config(args.config, EvalJobConfig, _overrides(args)))
    return 0


# What `make demo` runs: sized to finish on a 2-core laptop in the time the README states.
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-platform", description="Train and serve LLaVA-style models.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_data(sub)
    _add_model(sub)
    _add_chat(sub)
    _add_eval(sub)
    from llava_platform.demo import DEFAULTS as DEMO_DEFAULTS

    demo = sub.add_parser("demo", help="the end-to-end demo on the embedded default (local, CPU)")
    demo.add_argument("--workdir", default="demo_run", help="where data, models and runs go (default demo_run/)")
    demo.add_argument("--n", type=int, default=DEMO_DEFAULTS["n"],
                      help=f"synthetic training scenes (default {DEMO_DEFAULTS['n']})")
    demo.add_argument("--n-eval", type=int, default=DEMO_DEFAULTS["n_eval"],
                      help=f"held-out scenes, 5 questions each (default {DEMO_DEFAULTS['n_eval']})")
    demo.add_argument("--tower-steps", type=int, default=DEMO_DEFAULTS["tower_steps"],
                      help=f"stage 0: vision tower optimizer steps (default {DEMO_DEFAULTS['tower_steps']})")
    demo.add_argument("--lm-steps", type=int, default=DEMO_DEFAULTS["lm_steps"],
                      help=f"stage 0: language model optimizer steps (default {DEMO_DEFAULTS['lm_steps']})")
    demo.add_argument("--component", action="append", default=[], metavar="KEY=VALUE",
                      help="override stage 0's config, e.g. --component vision_tower.hidden_size=256 (repeatable)")
    demo.add_argument("--steps", type=int, default=DEMO_DEFAULTS["steps"],
                      help=f"stage-1 optimizer steps (default {DEMO_DEFAULTS['steps']})")
    demo.add_argument("--finetune-steps", type=int, default=DEMO_DEFAULTS["finetune_steps"],
                      help=f"stage-2 optimizer steps (default {DEMO_DEFAULTS['finetune_steps']})")
    demo.add_argument("--port", type=int, default=8000, help="Serve HTTP port on 127.0.0.1 (default 8000)")
    demo.add_argument("--no-wait", action="store_true", help="remove the Serve app and exit after the demo request")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from llava_platform.ray_utils import set_accelerator_env

    args = build_parser().parse_args(argv)
    set_accelerator_env()
    try:
        return args.func(args)
    except LlavaPlatformError as e:
        print(f"llava-platform: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
