"""The manifest round-trips typed, and a directory that is not prepared data is refused by name."""

import pytest

from llava_platform.data.prepared import Manifest, PreprocessError, read_manifest, write_manifest
from llava_platform.data.sample import SampleSpec


def test_manifest_round_trips_with_its_sample_spec(tmp_path):
    spec = SampleSpec("vicuna_v1", 512, 96, 9, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))
    manifest = Manifest(stage="finetune", records_in=3, written=2, rejected=1, rejects_by_reason={"bad_json": 1},
                        normalised_by_kind={}, template="vicuna_v1", template_sha256="t", tokenizer_sha256="k",
                        sample_spec=spec, image_layout={"shape": [96, 96, 3]}, sources={"data_path": "d.json"},
                        config={"stage": "finetune"}, created_unix=1)
    write_manifest(str(tmp_path), manifest)
    again = read_manifest(str(tmp_path))
    assert again == manifest and again.sample_spec == spec and again.shards == "shards/status=ok"


def test_not_prepared_data_is_refused(tmp_path):
    with pytest.raises(PreprocessError, match="no manifest.json"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text('{"stage": "finetune"}')
    with pytest.raises(PreprocessError, match="not a manifest this version reads .missing or invalid:.* written"):
        read_manifest(str(tmp_path))
