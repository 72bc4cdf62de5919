"""The preprocess job's model side: the tokenizer and sample spec follow the model and the stage."""

from llava_platform.config import PreprocessJobConfig, load_config
from llava_platform.model.presets import build_preset
from llava_platform.preprocess import sample_spec_for


def test_sample_spec_follows_the_model_and_the_stage(tmp_path):
    model, processor = build_preset("tiny")
    for stage, template in (("pretrain", "plain"), ("finetune", "vicuna_v1")):
        cfg = load_config(None, PreprocessJobConfig, [f"stage={stage}", "model.preset=tiny", "data.data_path=d.json",
                                                      f"output_path={tmp_path}/out", "data.max_length=77"])
        tokenizer, spec = sample_spec_for(cfg)
        assert spec.template == template and spec.max_length == 77
        assert spec.image_size == model.config.vision_config.image_size
        assert tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    cfg = load_config(None, PreprocessJobConfig, ["stage=finetune", "model.preset=tiny", "data.data_path=d.json",
                                                  f"output_path={tmp_path}/out", "data.template=llava_v1"])
    assert sample_spec_for(cfg)[1].template == "llava_v1"
