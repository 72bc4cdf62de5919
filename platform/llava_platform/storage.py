"""The one place that turns a URI into a filesystem.

Local paths (``/data/x``, ``file:///data/x``, relative paths) and ``s3://bucket/key`` are supported.
S3 settings come from :class:`StorageConfig`, else from the standard AWS environment variables,
else from botocore's credential chain (shared profiles, container and instance roles). Everything
else in the platform (data pipeline, checkpoints, model export, serving) goes through here.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from llava_platform.config.schema import StorageConfig
from llava_platform.errors import StorageError

_SUPPORTED = ("", "file", "s3")


def scheme(uri: str) -> str:
    """``"s3"`` for ``s3://...``, ``"file"`` for local paths and ``file://`` URIs.

    Raises:
        StorageError: an unsupported scheme (``gs://``, ``http://``...).
    """
    s = urlparse(str(uri)).scheme.lower()
    if len(s) == 1:  # a Windows drive letter, not a scheme
        s = ""
    if s not in _SUPPORTED:
        raise StorageError(f"unsupported storage URI {uri!r}: use a local path or s3://bucket/key")
    return s or "file"


def is_remote(uri: str) -> bool:
    return scheme(uri) == "s3"


def _local_path(uri: str, expand_user: bool = True) -> str:
    """A local URI without its ``file://`` (else ``~`` expanded, unless ``expand_user`` is false),
    as given otherwise (maybe relative)."""
    if str(uri).startswith("file://"):
        return str(uri)[len("file://") :]
    return os.path.expanduser(str(uri)) if expand_user else str(uri)


def strip_scheme(uri: str) -> str:
    """``bucket/key`` for ``s3://bucket/key``; an absolute local path for local URIs."""
    if is_remote(uri):
        return str(uri)[len("s3://") :].rstrip("/")
    return os.path.abspath(_local_path(uri))


#: Where a job's relative paths (inputs and outputs) lie, when set; else the working directory.
WORKSPACE_ENV = "LLAVA_WORKSPACE"


def absolute(uri: str | None) -> str | None:
    """``uri`` with a local path made absolute (Ray workers run in other directories): a relative
    one against ``$LLAVA_WORKSPACE`` when set, else the working directory; s3:// as is."""
    if uri is None or is_remote(uri):
        return uri
    workspace = os.environ.get(WORKSPACE_ENV)
    path = _local_path(uri)
    if workspace and not os.path.isabs(path):
        return join(workspace, path) if is_remote(workspace) else os.path.normpath(os.path.join(strip_scheme(workspace), path))
    return strip_scheme(uri)


def in_ray_job_copy(cwd: str | None = None) -> bool:
    """Whether this process runs in Ray's temporary copy of a job's ``--working-dir`` (deleted
    with the job's runtime environment)."""
    parts = Path(cwd or os.getcwd()).parts
    return "runtime_resources" in parts and any(p.startswith("working_dir_files") for p in parts)


def output_location(uri: str, key: str) -> str:
    """:func:`absolute` for a location a job writes (``key``: its config key).

    Raises:
        StorageError: a relative path inside Ray's copy of the working directory, with no
            ``$LLAVA_WORKSPACE``: the output would vanish with the job.
    """
    if (not is_remote(uri) and not os.path.isabs(_local_path(uri)) and not os.environ.get(WORKSPACE_ENV)
            and in_ray_job_copy()):
        raise StorageError(
            f"{key} {uri!r} is relative, and this job runs in Ray's temporary copy of the working directory "
            f"({os.getcwd()}), which is deleted after the job: give an absolute or s3:// path, or set "
            f"{WORKSPACE_ENV} for the job (ray job submit --runtime-env-json "
            f"'{{\"env_vars\": {{\"{WORKSPACE_ENV}\": \"/shared/work\"}}}}' ...) to resolve relative paths there")
    return absolute(uri)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/`` (local paths keep the OS separator)."""
    if is_remote(uri):
        return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(uri, *parts)


def inside(root: str, name: str) -> str | None:
    """The URI of ``name`` (a path relative to ``root``, or a full path or URI) when it lies
    inside ``root`` once ``..`` and ``.`` are resolved, else None. Lexical: a symlink inside the
    root is followed when read (datasets often link their image folders elsewhere)."""
    try:
        scheme(name)
    except StorageError:  # http://, gs://...: never inside a local or S3 root
        return None
    if is_remote(root):
        prefix = strip_scheme(root)
        if is_remote(name):
            key = strip_scheme(name)
        elif name.startswith("/") or name.startswith("file://"):
            return None
        else:
            key = posixpath.join(prefix, name)
        key = posixpath.normpath(key)
        return f"s3://{key}" if key.startswith(prefix + "/") else None
    if is_remote(name):
        return None
    base = strip_scheme(root)
    path = os.path.normpath(os.path.join(base, _local_path(name, expand_user=False)))  # a record's ~ is literal  # an absolute name replaces base: checked below
    return path if path.startswith(base.rstrip(os.sep) + os.sep) else None


class FileTooLarge(OSError):
    """A file over the size a caller allows."""


class NotARegularFile(OSError):
    """A device, FIFO, socket or directory where a file was expected."""


def read_many(uris: list[str], max_bytes: int, config: StorageConfig | None = None) -> dict[str, bytes | Exception]:
    """Read whole files, each at most ``max_bytes``: per URI its bytes, or the exception that
    stopped it (``FileNotFoundError``, :class:`FileTooLarge`, :class:`NotARegularFile`, other
    ``OSError``). Local files are checked with ``stat`` before they are opened (a symlink to
    ``/dev/zero`` or a FIFO is never read); S3 objects are read with one ranged GET each,
    concurrently. All URIs are on one filesystem (that of the first)."""
    if not uris:
        return {}
    out: dict[str, bytes | Exception] = {}
    if not is_remote(uris[0]):
        for uri in dict.fromkeys(uris):
            path = strip_scheme(uri)
            try:
                st = os.stat(path)
                if not stat.S_ISREG(st.st_mode):
                    raise NotARegularFile(f"{uri} is not a regular file")
                if st.st_size > max_bytes:
                    raise FileTooLarge(f"{uri} is {st.st_size} bytes, over the limit of {max_bytes}")
                with open(path, "rb") as f:
                    data = f.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise FileTooLarge(f"{uri} grew over the limit of {max_bytes} bytes while read")
                out[uri] = data
            except OSError as e:
                out[uri] = e
        return out
    fs, _ = filesystem(uris[0], config)
    paths = {u: strip_scheme(u) for u in uris}
    # One byte past the limit tells "too large" from "exactly the limit".
    got = fs.cat(list(set(paths.values())), start=0, end=max_bytes + 1, on_error="return")
    for uri, path in paths.items():
        data = got.get(path, FileNotFoundError(path))
        if isinstance(data, bytes) and len(data) > max_bytes:
            data = FileTooLarge(f"{uri} is over the limit of {max_bytes} bytes")
        elif isinstance(data, Exception) and not isinstance(data, FileNotFoundError):
            try:  # S3 refuses a byte range of an empty object (InvalidRange): it is simply empty
                if fs.info(path).get("size") == 0:
                    data = b""
            except Exception:  # noqa: BLE001 - keep the read's own error
                pass
        out[uri] = data
    return out


@dataclass(frozen=True)
class S3Settings:
    """Resolved S3 connection settings (secrets kept out of ``repr``)."""

    endpoint_url: str | None
    region: str | None
    key: str | None
    secret: str | None
    token: str | None
    anon: bool

    def __repr__(self) -> str:
        return f"S3Settings(endpoint_url={self.endpoint_url!r}, region={self.region!r}, anon={self.anon})"


def resolve_s3(config: StorageConfig | None = None) -> S3Settings:
    """Resolve S3 settings: config first, then the AWS environment, then botocore's chain.

    Raises:
        StorageError: no credentials could be found and ``anon`` is not set.
    """
    cfg = config or StorageConfig()
    env = os.environ
    endpoint = cfg.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    region = cfg.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if cfg.anon:
        return S3Settings(endpoint, region, None, None, None, True)
    key = cfg.access_key_id or env.get("AWS_ACCESS_KEY_ID")
    secret = cfg.secret_access_key.get_secret_value() if cfg.secret_access_key else env.get("AWS_SECRET_ACCESS_KEY")
    token = cfg.session_token.get_secret_value() if cfg.session_token else env.get("AWS_SESSION_TOKEN")
    if bool(key) != bool(secret):
        raise StorageError(
            "S3 credentials are incomplete: give both an access key id and a secret access key"
            " (storage.access_key_id/secret_access_key or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
        )
    if not key:
        # Profiles, SSO, container and instance roles: let botocore find them.
        import botocore.session

        creds = botocore.session.get_session().get_credentials()
        if creds is None:
            raise StorageError(
                "no S3 credentials found: set storage.access_key_id and storage.secret_access_key in the"
                " config, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or an AWS profile/instance role);"
                " for a public bucket set storage.anon: true"
            )
        frozen = creds.get_frozen_credentials()
        key, secret, token = frozen.access_key, frozen.secret_key, frozen.token
        region = region or botocore.session.get_session().get_config_variable("region")
    return S3Settings(endpoint, region, key, secret, token, False)


def filesystem(uri: str, config: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem for ``uri`` and the path within it.

    Raises:
        StorageError: unsupported scheme or missing S3 credentials.
    """
    if not is_remote(uri):
        return LocalFileSystem(auto_mkdir=True), strip_scheme(uri)
    s3 = resolve_s3(config)
    import s3fs

    client_kwargs = {"region_name": s3.region} if s3.region else {}
    fs = s3fs.S3FileSystem(
        anon=s3.anon,
        key=s3.key,
        secret=s3.secret,
        token=s3.token,
        endpoint_url=s3.endpoint_url,
        client_kwargs=client_kwargs,
        skip_instance_cache=True,
    )
    return fs, strip_scheme(uri)


def arrow_filesystem(uri: str, config: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for ``uri`` and the path within it (bucket/key, no ``s3://``), as
    Ray Data and Ray Train's ``storage_filesystem`` take it."""
    if not is_remote(uri):
        return pafs.LocalFileSystem(), strip_scheme(uri)
    s3 = resolve_s3(config)
    kwargs: dict = {"anonymous": s3.anon, "region": s3.region or "us-east-1"}
    if not s3.anon:
        kwargs.update(access_key=s3.key, secret_key=s3.secret, session_token=s3.token)
    if s3.endpoint_url:
        parsed = urlparse(s3.endpoint_url)
        kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
        # S3-compatible servers rarely support virtual-host addressing.
        kwargs["force_virtual_addressing"] = False
    return pafs.S3FileSystem(**kwargs), strip_scheme(uri)


def exists(uri: str, config: StorageConfig | None = None) -> bool:
    fs, path = filesystem(uri, config)
    return fs.exists(path)


def read_bytes(uri: str, config: StorageConfig | None = None) -> bytes:
    """Read a whole object.

    Raises:
        FileNotFoundError: the object does not exist.
    """
    fs, path = filesystem(uri, config)
    return fs.cat_file(path)


def check_writable(uri: str, what: str, config: StorageConfig | None = None) -> None:
    """Before long work: create ``uri`` (a directory or S3 prefix) if needed and write, then
    delete, a small probe object in it.

    Raises:
        StorageError: it cannot be written, naming ``what`` (the config key) and why.
    """
    probe = join(uri, f".write-check-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        fs, path = filesystem(probe, config)
        if not is_remote(uri):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        fs.pipe_file(path, b"ok")
        fs.rm_file(path)
    except (OSError, ValueError) as e:  # PermissionError, read-only file system, no space, S3 access denied
        raise StorageError(f"{what} {uri} is not writable ({type(e).__name__}: {e}); "
                           "give a location this job can write to") from None


def write_bytes(uri: str, data: bytes, config: StorageConfig | None = None) -> None:
    fs, path = filesystem(uri, config)
    if not is_remote(uri):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fs.pipe_file(path, data)


def upload_dir(local_dir: str | Path, uri: str, config: StorageConfig | None = None) -> None:
    """Copy a local directory tree to ``uri`` (a local copy when ``uri`` is local)."""
    fs, path = filesystem(uri, config)
    if not is_remote(uri):
        if os.path.abspath(local_dir) != path:
            shutil.copytree(local_dir, path, dirs_exist_ok=True)
        return
    fs.put(str(local_dir).rstrip("/") + "/", path, recursive=True)


def publish_dir(local_dir: str | Path, uri: str, config: StorageConfig | None = None) -> None:
    """Copy a finished local directory (a model export) to ``uri`` so that a reader never finds a
    half-written one. Locally: copied beside the target under a temporary name, then renamed over
    it (the old one removed after); a failed copy (disk full) leaves the target as it was and no
    partial folder. On S3 (no rename): every file is uploaded, ``config.json`` last, so that an
    interrupted upload is not loadable as a model.

    Raises:
        OSError: the copy failed (nothing partial is left locally).
    """
    fs, path = filesystem(uri, config)
    if is_remote(uri):
        files = sorted((p for p in Path(local_dir).rglob("*") if p.is_file()), key=lambda p: p.name == "config.json")
        for f in files:
            fs.put_file(str(f), f"{path}/{f.relative_to(local_dir).as_posix()}")
        return
    parent = os.path.dirname(path.rstrip(os.sep)) or "."
    os.makedirs(parent, exist_ok=True)
    tag = f"{os.getpid()}-{os.urandom(4).hex()}"
    partial, old = f"{path}.partial-{tag}", f"{path}.old-{tag}"
    try:
        shutil.copytree(local_dir, partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(partial, path)
    shutil.rmtree(old, ignore_errors=True)


def local_dir(uri: str, config: StorageConfig | None = None, cache_root: str | Path | None = None,
              skip_suffixes: tuple[str, ...] = ()) -> str:
    """A local directory holding the tree at ``uri``: the path itself when local, else a download
    into a cache keyed by the URI (``$LLAVA_PLATFORM_CACHE`` or ``~/.cache/llava_platform``).

    ``skip_suffixes`` leaves matching files out of a download (weights, when only configs and the
    tokenizer are wanted).

    Raises:
        FileNotFoundError: nothing exists at ``uri``.
    """
    if not is_remote(uri):
        path = strip_scheme(uri)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{uri} does not exist")
        return path
    fs, path = filesystem(uri, config)
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri} does not exist")
    root = Path(cache_root or os.environ.get("LLAVA_PLATFORM_CACHE") or Path.home() / ".cache" / "llava_platform")
    key = uri + ("|skip:" + ",".join(skip_suffixes) if skip_suffixes else "")
    target = root / "s3" / hashlib.sha256(key.encode()).hexdigest()[:16]
    target.mkdir(parents=True, exist_ok=True)
    if not skip_suffixes:
        fs.get(path.rstrip("/") + "/", str(target), recursive=True)
        return str(target)
    prefix = path.rstrip("/") + "/"
    for remote in fs.find(prefix):
        if not remote.endswith(skip_suffixes):
            dest = target / remote[len(prefix):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get(remote, str(dest))
    return str(target)
