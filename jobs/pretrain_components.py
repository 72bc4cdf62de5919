"""Stage 0 of the embedded default: a small CLIP-style vision tower and a small causal LM, made on the
synthetic world with Ray Train + DeepSpeed, written as plain HF directories that LLaVA composes
exactly as it composes CLIP ViT-L/14-336 and Vicuna-7B (real runs skip this: they start from those).

    llava-platform data synth --out data/synth --n 3000
    python jobs/pretrain_components.py --config jobs/configs/components_small.yaml
    llava-platform model build --vision-tower models/components/vision_tower \
        --llm models/components/language_model --out models/llava-init
"""

import sys

from llava_platform.config import ComponentsJobConfig
from llava_platform.jobs import job_main
from llava_platform.train.components import run_components

if __name__ == "__main__":
    sys.exit(job_main(__doc__, ComponentsJobConfig, run_components))
