"""What every ``jobs/*.py`` entry point shares: parse ``--config``/``--set``, validate, start or join
Ray, run one library function, turn user errors into one clear message and exit status 2."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence, TypeVar

from pydantic import BaseModel

from llava_platform.errors import LlavaPlatformError

C = TypeVar("C", bound=BaseModel)


def job_main(doc: str, config_cls: type[C], run: Callable[[C], object], argv: Sequence[str] | None = None) -> int:
    """Run a job: ``--config FILE [--set key=value ...]``, validated against ``config_cls``.

    Returns:
        The process exit status (0, or 2 for a user error).
    """
    from llava_platform.config.loader import load_config
    from llava_platform.ray_utils import init_ray, set_accelerator_env

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file (see jobs/configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value with a dotted key, e.g. --set train.lr=2e-5 (repeatable)")
    args = parser.parse_args(argv)
    set_accelerator_env()
    try:
        cfg = load_config(args.config, config_cls, args.set)
        init_ray()
        run(cfg)
    except LlavaPlatformError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
