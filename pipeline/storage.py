"""Local folders and S3 (or S3-compatible stores) behind one interface: clients, reading an object, a pyarrow
filesystem, and the checks before any work (a bucket that answers, a store that takes conditional writes).
Listing is pipeline/listing.py's.

boto3 lists and reads objects (it reports each object's ETag and VersionId); pyarrow's S3FileSystem writes
and reads Parquet. Both get the same settings from ``StorageConfig``: standard retry mode (throttling such
as 503 SlowDown and transient 5xx are retried with backoff), connect/read timeouts, a connection pool.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_to_bytes, urlparse

from pyarrow import fs as pafs

from pipeline.config import StorageConfig


class StorageError(RuntimeError):
    """Object storage is unreachable, a bucket is missing, or access is denied; the message says which."""


@dataclass(frozen=True)
class ObjectBytes:
    data: bytes
    size: int
    etag: str | None
    version_id: str | None


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """(bucket, key) of ``s3://bucket/key``, the key exactly as written: ``#``, ``?``, spaces, any character
    and a leading ``/`` are part of it (a URL parser would take ``#`` for a fragment and ``?`` for a query)."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def local_uri(path: Path) -> str:
    """A local file's URI as docqa records it: its path, or, when its name is not valid UTF-8 (a name in
    another encoding), ``file://`` and its bytes percent-encoded, so that it can be stored and read back."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "file://" + quote(os.fsencode(path))
    return text


def local_path(uri: str) -> Path:
    """The local path of a URI that ``local_uri`` made."""
    return Path(os.fsdecode(unquote_to_bytes(uri[len("file://") :]))) if uri.startswith("file://") else Path(uri)


def endpoint_of(storage: StorageConfig) -> str | None:
    return storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@functools.lru_cache(maxsize=8)
def s3_client(storage: StorageConfig):
    """One boto3 client per process and settings (clients are thread-safe and pool their connections)."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_of(storage),
        region_name=storage.region,
        config=Config(
            retries={"mode": "standard", "max_attempts": storage.max_attempts},
            connect_timeout=storage.connect_timeout_s,
            read_timeout=storage.read_timeout_s,
            max_pool_connections=storage.max_pool_connections,
            s3={"addressing_style": "path"} if endpoint_of(storage) else {},
        ),
    )


def filesystem_for(uri: str, storage: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for a local path or an s3:// URI."""
    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    bucket, key = split_s3(uri)
    return _s3_filesystem(storage), f"{bucket}/{key}".rstrip("/")


@functools.lru_cache(maxsize=8)
def _s3_filesystem(storage: StorageConfig) -> pafs.S3FileSystem:
    """One pyarrow S3 filesystem per process and settings, as for the boto3 client."""
    endpoint = endpoint_of(storage)
    options: dict[str, Any] = {
        "region": storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        "connect_timeout": storage.connect_timeout_s,
        "request_timeout": storage.read_timeout_s,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=storage.max_attempts),
    }
    if endpoint:
        parsed = urlparse(endpoint)
        options.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
    return pafs.S3FileSystem(**options)


def describe_client_error(error: Exception, what: str) -> str:
    """A readable reason for a failed storage call; never includes credentials (botocore errors don't)."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(error, NoCredentialsError):
        return f"{what}: no AWS credentials found (environment, profile or instance role)"
    if isinstance(error, EndpointConnectionError):
        return f"{what}: cannot reach the S3 endpoint {error.kwargs.get('endpoint_url', '')}".rstrip()
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket", "404"):  # HEAD requests carry no body: a missing bucket is code "404"
            return f"{what}: the bucket does not exist"
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
            return f"{what}: access denied ({code}); check the credentials and the bucket policy"
        return f"{what}: {code or status}: {error.response.get('Error', {}).get('Message', '')}".rstrip(": ")
    return f"{what}: {type(error).__name__}: {error}"


def check_bucket(uri: str, storage: StorageConfig) -> None:
    """Fail fast (before any work) on a missing bucket, a wrong endpoint or denied credentials."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _ = split_s3(uri)
    try:
        s3_client(storage).head_bucket(Bucket=bucket)
    except (BotoCoreError, ClientError) as error:
        raise StorageError(describe_client_error(error, f"bucket {bucket!r} ({uri})")) from None


def check_writable_output(uri: str, storage: StorageConfig) -> None:
    """Fail fast, before any work, where the output's S3 store cannot take Delta commits safely.

    delta-rs commits a table version by writing its log entry with ``If-None-Match: *`` (put if absent): of
    two writers committing the same version, one gets 412 and retries on the new version. A store that
    ignores the header (some S3-compatible servers and proxies) lets the second writer overwrite the first
    one's commit without an error, silently losing its rows. So a probe object is written twice with the
    header: the second write must be refused. A store that refuses the header outright (501) is named too.
    """
    from uuid import uuid4

    from botocore.exceptions import BotoCoreError, ClientError

    check_bucket(uri, storage)
    bucket, key = split_s3(uri)
    probe = f"{key.rstrip('/')}/_docqa_probe/{uuid4().hex}".lstrip("/")
    client = s3_client(storage)
    needs = (
        "docqa's Delta commits need conditional writes (PUT with If-None-Match: *), as AWS S3, MinIO, "
        "Cloudflare R2 and moto do them; without them two writers could overwrite each other's commits"
    )
    try:
        client.put_object(Bucket=bucket, Key=probe, Body=b"", IfNoneMatch="*")
        try:
            client.put_object(Bucket=bucket, Key=probe, Body=b"", IfNoneMatch="*")
        except ClientError as error:
            if error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                return  # refused: the store honours put-if-absent
            raise
        raise StorageError(
            f"output {uri}: the store at {endpoint_of(storage) or 'AWS S3'} ignores conditional writes: a second "
            f"PUT with If-None-Match: * of one key was accepted. {needs}"
        )
    except (BotoCoreError, ClientError) as error:
        status = getattr(error, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        reason = describe_client_error(error, f"output {uri}: a conditional write")
        raise StorageError(f"{reason}. {needs}" if status == 501 else reason) from None
    finally:
        try:
            client.delete_object(Bucket=bucket, Key=probe)
        except (BotoCoreError, ClientError):
            pass  # best effort: an empty probe object left behind harms no reader of the tables


def read_object(uri: str, storage: StorageConfig, max_bytes: int) -> ObjectBytes:
    """Read a whole object, or only learn its size when it is over ``max_bytes`` (then ``data`` is empty)."""
    if not is_s3(uri):
        path = local_path(uri)
        size = path.stat().st_size
        return ObjectBytes(path.read_bytes() if size <= max_bytes else b"", size, None, None)
    bucket, key = split_s3(uri)
    response = s3_client(storage).get_object(Bucket=bucket, Key=key)
    body = response["Body"]
    try:
        size = int(response["ContentLength"])
        data = body.read() if size <= max_bytes else b""
    finally:
        body.close()
    return ObjectBytes(data, size, response.get("ETag", "").strip('"') or None, response.get("VersionId"))
