"""Evaluate a LLaVA model on a model_vqa question file: batched generation on Ray Data, scores
(exact match, POPE yes/no, per category), the blind baseline, an optional LLM judge, MLflow.

    # on a laptop, after the smoke runs of preprocess, pretrain and finetune (see the config's header):
    python jobs/evaluate.py --config jobs/configs/evaluate_vqa_smoke.yaml
    # on a cluster:
    ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/evaluate_vqa_7b.yaml
"""

import sys

from llava_platform.config import EvalJobConfig
from llava_platform.eval.evaluate import run_evaluation
from llava_platform.jobs import job_main

if __name__ == "__main__":
    sys.exit(job_main(__doc__, EvalJobConfig, run_evaluation))
