"""LLaVA stage 2 (visual instruction tuning: projector + LLM, or LoRA) on Ray Train + DeepSpeed.

    # on a laptop (starts a local Ray; prepare the smoke data first, see the config's header):
    python jobs/finetune.py --config jobs/configs/finetune_smoke.yaml
    # on a cluster:
    ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/finetune_7b.yaml
"""

import sys

from llava_platform.config import TrainJobConfig
from llava_platform.jobs import job_main
from llava_platform.train.trainer import run_stage

if __name__ == "__main__":
    sys.exit(job_main(__doc__, TrainJobConfig, run_stage))
