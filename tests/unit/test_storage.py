"""Storage against the local filesystem and a real S3 API (moto's server on 127.0.0.1)."""

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
