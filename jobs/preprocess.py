"""Preprocess LLaVA records + images into tokenized Parquet shards on Ray Data.

    # on a laptop (starts a local Ray):
    llava-platform data synth --out data/synth --n 200
    python jobs/preprocess.py --config jobs/configs/preprocess_mix665k_smoke.yaml
    # on a cluster:
    ray job submit --working-dir . -- python jobs/preprocess.py --config jobs/configs/preprocess_mix665k.yaml
"""

import sys

from llava_platform.config import PreprocessJobConfig
from llava_platform.preprocess import run_prepare
from llava_platform.jobs import job_main

if __name__ == "__main__":
    sys.exit(job_main(__doc__, PreprocessJobConfig, run_prepare))
