from llava_platform.config.schema import TrainConfig
from llava_platform.train.deepspeed_config import build_deepspeed_config


def cfg(**kw):
    base = dict(stage="finetune", global_batch_size=128, micro_batch_size=4, num_workers=8, lr=2e-5)
    return TrainConfig(**{**base, **kw})


def test_batch_arithmetic_and_precision():
    ds = build_deepspeed_config(cfg(precision="bf16"))
    assert ds["train_batch_size"] == 128 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4  # 128 = 4 x 4 x 8
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 1.0 and ds["zero_force_ds_cpu_optimizer"] is False


def test_zero_stages_and_offload():
    z2 = build_deepspeed_config(cfg(zero_stage=2, offload_optimizer=True))["zero_optimization"]
    assert z2["stage"] == 2 and z2["offload_optimizer"]["device"] == "cpu" and "offload_param" not in z2
    z3 = build_deepspeed_config(cfg(zero_stage=3, offload_params=True))["zero_optimization"]
    assert z3["stage3_gather_16bit_weights_on_model_save"] and z3["offload_param"]["device"] == "cpu"
    assert build_deepspeed_config(cfg(zero_stage=0))["zero_optimization"] == {"stage": 0}


def test_overrides_merge_deeply():
    ds = build_deepspeed_config(cfg(zero_stage=3), {"zero_optimization": {"stage3_max_live_parameters": 1}, "x": 2})
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["stage3_max_live_parameters"] == 1
    assert ds["x"] == 2
