"""Storage against the local filesystem and a real S3 API (moto's server on 127.0.0.1)."""

import shutil

import pyarrow.fs as pafs
import pytest

from llava_platform import storage
from llava_platform.config.schema import StorageConfig
from llava_platform.errors import StorageError


def test_scheme_and_paths(tmp_path):
    assert storage.scheme("/a/b") == "file"
    assert storage.scheme("file:///a/b") == "file"
    assert storage.scheme("s3://bucket/k") == "s3"
    assert storage.strip_scheme("s3://bucket/k/") == "bucket/k"
    assert storage.strip_scheme("file:///a/b") == "/a/b"
    assert storage.join("s3://b/x/", "/y", "z") == "s3://b/x/y/z"
    assert storage.join(str(tmp_path), "y") == str(tmp_path / "y")


@pytest.mark.parametrize("uri", ["gs://bucket/x", "http://host/x", "hdfs://nn/x"])
def test_unsupported_scheme(uri):
    with pytest.raises(StorageError, match="unsupported storage URI"):
        storage.filesystem(uri)


def test_local_roundtrip(tmp_path):
    uri = str(tmp_path / "deep" / "f.bin")
    storage.write_bytes(uri, b"abc")
    assert storage.exists(uri) and storage.read_bytes(uri) == b"abc"
    fs, path = storage.arrow_filesystem(uri)
    assert isinstance(fs, pafs.LocalFileSystem) and path == uri


def test_local_dir_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        storage.local_dir(str(tmp_path / "absent"))


def test_s3_without_credentials_is_a_clear_error(no_aws_credentials):
    with pytest.raises(StorageError, match="no S3 credentials found.*AWS_ACCESS_KEY_ID.*anon"):
        storage.filesystem("s3://bucket/key")
    with pytest.raises(StorageError, match="no S3 credentials found"):
        storage.arrow_filesystem("s3://bucket/key")


def test_s3_incomplete_credentials(no_aws_credentials, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "only-the-id")
    with pytest.raises(StorageError, match="incomplete"):
        storage.filesystem("s3://bucket/key")


def test_s3_anonymous_needs_no_credentials(no_aws_credentials):
    fs, path = storage.filesystem("s3://bucket/key", StorageConfig(anon=True))
    assert fs.anon and path == "bucket/key"


@pytest.mark.s3
def test_s3_roundtrip_with_config(s3_server, no_aws_credentials):
    cfg = s3_server.storage_config()
    bucket = s3_server.new_bucket()
    uri = f"s3://{bucket}/a/b.bin"
    storage.write_bytes(uri, b"\x00payload", cfg)
    assert storage.exists(uri, cfg)
    assert storage.read_bytes(uri, cfg) == b"\x00payload"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"s3://{bucket}/missing", cfg)


@pytest.mark.s3
def test_s3_settings_from_environment(s3_env):
    bucket = s3_env.new_bucket()
    uri = f"s3://{bucket}/env.txt"
    storage.write_bytes(uri, b"from env")
    assert storage.read_bytes(uri) == b"from env"
    assert "testing-secret" not in repr(storage.resolve_s3())


@pytest.mark.s3
def test_s3_arrow_filesystem(s3_server, no_aws_credentials):
    cfg = s3_server.storage_config()
    bucket = s3_server.new_bucket()
    fs, path = storage.arrow_filesystem(f"s3://{bucket}/dir/x.txt", cfg)
    assert path == f"{bucket}/dir/x.txt"
    with fs.open_output_stream(path) as f:
        f.write(b"arrow")
    assert storage.read_bytes(f"s3://{bucket}/dir/x.txt", cfg) == b"arrow"


@pytest.mark.s3
def test_s3_upload_and_download_tree(s3_server, no_aws_credentials, tmp_path):
    cfg = s3_server.storage_config()
    bucket = s3_server.new_bucket()
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("A")
    (src / "sub" / "b.txt").write_text("B")
    storage.upload_dir(src, f"s3://{bucket}/tree", cfg)
    local = storage.local_dir(f"s3://{bucket}/tree", cfg, cache_root=tmp_path / "cache")
    assert (tmp_path / "cache") in __import__("pathlib").Path(local).parents
    got = {p.relative_to(local).as_posix(): p.read_text() for p in __import__("pathlib").Path(local).rglob("*.txt")}
    assert got == {"a.txt": "A", "sub/b.txt": "B"}
    with pytest.raises(FileNotFoundError):
        storage.local_dir(f"s3://{bucket}/nothing-here", cfg, cache_root=tmp_path / "cache")


def test_publish_dir_replaces_a_folder_whole_or_leaves_it_as_it_was(tmp_path):
    """Measured before: a full disk left a config.json of 0 bytes and a truncated model.safetensors
    in the export. (A dangling link stands for the copy failing half-way.)"""
    target = tmp_path / "export"
    target.mkdir()
    (target / "config.json").write_text("old")
    good = tmp_path / "good"
    good.mkdir()
    (good / "config.json").write_text("new")
    (good / "model.safetensors").write_bytes(b"w" * 100)
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    (broken / "tokenizer.json").symlink_to(tmp_path / "gone")
    with pytest.raises(OSError):
        storage.publish_dir(broken, str(target))
    assert sorted(p.name for p in target.iterdir()) == ["config.json"] and (target / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "export", "good"]  # no partial folder left
    storage.publish_dir(good, str(target))
    assert (target / "config.json").read_text() == "new" and (target / "model.safetensors").stat().st_size == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "export", "good"]
    storage.publish_dir(good, str(tmp_path / "fresh" / "export"))  # a target that does not exist yet
    assert (tmp_path / "fresh" / "export" / "config.json").read_text() == "new"


@pytest.mark.s3
def test_publish_dir_to_s3_uploads_the_tree_config_json_last(s3_server, no_aws_credentials, tmp_path):
    cfg = s3_server.storage_config()
    bucket = s3_server.new_bucket()
    src = tmp_path / "export"
    (src / "sub").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "sub/x.txt"):
        (src / name).write_text(name)
    storage.publish_dir(src, f"s3://{bucket}/export", cfg)
    fs, _ = storage.filesystem(f"s3://{bucket}", cfg)
    found = sorted(p.split("/export/", 1)[1] for p in fs.find(f"{bucket}/export"))
    assert found == ["config.json", "model.safetensors", "sub/x.txt"]
    assert storage.read_bytes(f"s3://{bucket}/export/sub/x.txt", cfg) == b"sub/x.txt"
