"""The object store under S3Device: where an image's bytes live, and the few S3 calls the device makes.

Layout (the same as nbdkit's S3 plugin, so that either server opens the other's images): an image of SIZE
bytes under KEY is cut into objects of OBJECT_SIZE bytes, object ``i`` holding bytes ``i * OBJECT_SIZE`` up to
the next object, stored as ``KEY/%016x`` (``i`` in 16 lower-case hex digits). An object that does not exist
reads as zeros; every object that exists has exactly OBJECT_SIZE bytes. A single object (no SIZE) is an image
of its own size, read with ranged GETs.

The calls go through obstore (the Rust ``object_store`` crate): against boto3 on the same store it moves more
data per second for both PUT and GET (bench/bench_s3_clients.py), and its blocking calls release the GIL, so
the device's threads overlap. Its
requests have bounded timeouts and a bounded number of retries (``S3Settings``), so no call takes longer than
``S3Settings.call_limit``. Conditional PUTs (If-None-Match, If-Match on an ETag) are there for the image's
lease (``_s3lease``), and every PUT or DELETE of the image's own objects first asks ``fence`` whether this
server may still write.

Credentials come from the standard AWS chain as botocore reads it: the environment (AWS_ACCESS_KEY_ID, ...),
the shared credentials and config files, a profile (AWS_PROFILE), a container or instance role; refreshable
credentials are re-read as they expire. With none at all, requests go unsigned (public buckets).
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

__all__ = ["S3Settings", "ObjectStore", "StoreError", "object_key", "parse_object_key"]

log = logging.getLogger("nbdproto.devices.s3")

_CODE = re.compile(r"<Code>([^<]+)</Code>")
_STATUS = re.compile(r"status code: (\d{3}(?: [A-Za-z ]+)?)")
_RETRIES = re.compile(r"after (\d+) retries")
_TIMED_OUT = re.compile(r"timed out|TimedOut|deadline has elapsed", re.IGNORECASE)


def object_key(key: str, index: int) -> str:
    """The name of object ``index`` of the image at ``key``: ``KEY/%016x``."""
    return f"{key}/{index:016x}"


_INDEX = re.compile(r"[0-9a-f]{16}")


def parse_object_key(key: str, name: str) -> int | None:
    """The object index that ``name`` holds in the image at ``key``, or None for a name outside the layout."""
    prefix = key + "/"
    if not name.startswith(prefix):
        return None
    tail = name[len(prefix) :]
    if not _INDEX.fullmatch(tail):
        return None
    return int(tail, 16)


class StoreError(OSError):
    """A store request that failed for good (after its retries): ``errno`` says how the device reports it
    (ENOENT for a missing bucket, EACCES for refused credentials, ETIMEDOUT, else EIO); the message is one line."""


@dataclass(frozen=True)
class S3Settings:
    """How to reach the store and how long to wait for it.

    - ``endpoint``: the URL of a non-AWS store (MinIO, Ceph RGW, SeaweedFS); default: the AWS_ENDPOINT_URL_S3
      or AWS_ENDPOINT_URL environment variable, else AWS itself.
    - ``region``: default: the chain's (AWS_REGION, the profile's), else us-east-1.
    - ``profile``: a profile of the shared config files; default: AWS_PROFILE, else "default".
    - ``timeout``: the most one try of a request may take, connecting included; ``connect_timeout`` for
      connecting.
    - ``retries``: how often a failed or timed-out request is tried again, after a backoff of up to
      ``max_backoff``, and ``retry_timeout``: no try starts later than this after the first (plus a backoff).
      ``call_limit`` adds them up. The defaults are ``S3Settings.within(30)``.
    """

    endpoint: str | None = None
    region: str | None = None
    profile: str | None = None
    timeout: float = 15.0
    connect_timeout: float = 5.0
    retries: int = 3
    retry_timeout: float = 12.0
    max_backoff: float = 3.0

    @property
    def call_limit(self) -> float:
        """The most one call may take, every try included: the last may start ``retry_timeout`` plus a backoff
        after the first, and take ``timeout``."""
        return self.retry_timeout + self.max_backoff + self.timeout

    @classmethod
    def within(cls, seconds: float, **fields: Any) -> S3Settings:
        """Settings whose every call ends within ``seconds`` (``nbdproto serve --remote-timeout``): half of it
        for one try, the rest for starting retries (a tenth, at most 3 s, for one backoff); ``fields`` set
        the endpoint, region and profile."""
        if not seconds > 0:
            raise ValueError(f"the remote timeout {seconds} must be positive")
        backoff = min(3.0, seconds / 10)
        return cls(
            timeout=seconds / 2,
            connect_timeout=min(5.0, seconds / 2),
            retry_timeout=seconds / 2 - backoff,
            max_backoff=backoff,
            **fields,
        )


class _ChainCredentials:
    """obstore's credential provider over botocore's chain: called again as each answer expires."""

    def __init__(self, credentials: Any) -> None:
        self._credentials = credentials

    def __call__(self) -> dict[str, Any]:
        frozen = self._credentials.get_frozen_credentials()
        return {
            "access_key_id": frozen.access_key,
            "secret_access_key": frozen.secret_key,
            "token": frozen.token,
            # botocore refreshes ahead of expiry itself; asking it again every few minutes picks that up.
            "expires_at": datetime.now(timezone.utc) + timedelta(minutes=5),
        }


def _chain(profile: str | None) -> tuple[Any, str | None]:
    """(botocore's credentials or None, the chain's region or None)."""
    try:
        import botocore.exceptions
        import botocore.session
    except ImportError as exc:
        raise StoreError(errno.ENOPKG, "S3 needs botocore and obstore: pip install 'nbdproto[s3]'") from exc
    try:
        session = botocore.session.Session(profile=profile)
        return session.get_credentials(), session.get_config_variable("region")
    except botocore.exceptions.BotoCoreError as exc:
        raise StoreError(errno.EINVAL, f"cannot read the AWS credentials: {exc}") from None


class ObjectStore:
    """One bucket of an S3-compatible store, reached with ``settings``; safe to call from many threads.

    Every method raises StoreError with a one-line message when the store fails for good; ``get`` and
    ``get_range`` answer None for an object that does not exist.
    """

    def __init__(self, bucket: str, settings: S3Settings = S3Settings()) -> None:
        try:
            import obstore
            from obstore.store import S3Store
        except ImportError as exc:
            raise StoreError(errno.ENOPKG, "S3 needs botocore and obstore: pip install 'nbdproto[s3]'") from exc
        self.bucket = bucket
        self._obstore = obstore
        self.fence: Callable[[], None] | None = None
        """Called before every ``put`` and ``delete``: raises OSError when this server may no longer write
        (the image's lease is lost)."""
        credentials, chain_region = _chain(settings.profile)
        endpoint = settings.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.endpoint = endpoint
        config: Any = {"region": settings.region or chain_region or "us-east-1"}
        if endpoint:
            config["endpoint"] = endpoint
        # Path-style addressing: what non-AWS stores expect, and what AWS still accepts.
        config["virtual_hosted_style_request"] = False
        # As botocore does: over TLS the payload is not hashed into the signature (TLS already protects it, and
        # the hash costs both ends CPU on every PUT); over plain HTTP the signature covers the payload.
        config["unsigned_payload"] = not (endpoint and endpoint.startswith("http://"))
        kwargs: dict[str, Any] = {}
        if credentials is None:
            config["skip_signature"] = True
            self.signed = False
        else:
            self.signed = True
            kwargs["credential_provider"] = _ChainCredentials(credentials)
        client_options: Any = {
            "timeout": timedelta(seconds=settings.timeout),
            "connect_timeout": timedelta(seconds=settings.connect_timeout),
            "allow_http": bool(endpoint and endpoint.startswith("http://")),
        }
        retry_config: Any = {
            "max_retries": settings.retries,
            "retry_timeout": timedelta(seconds=settings.retry_timeout),
            "backoff": {
                "init_backoff": timedelta(milliseconds=min(100, settings.max_backoff * 1000)),
                "max_backoff": timedelta(seconds=settings.max_backoff),
                "base": 2,
            },
        }
        try:
            self._store = S3Store(
                bucket, config=config, client_options=client_options, retry_config=retry_config, **kwargs
            )
        except Exception as exc:
            raise StoreError(errno.EINVAL, f"cannot use bucket {bucket!r}: {_one_line(exc)}") from None

    def get_range(self, name: str, start: int, end: int) -> tuple[Any, int] | None:
        """The bytes ``start`` to ``end`` of object ``name`` (fewer where the object is shorter) and the
        object's whole size; None if the object does not exist."""
        try:
            result = self._obstore.get(self._store, name, options={"range": (start, end)})
            data = result.bytes()
        except FileNotFoundError:
            return None
        except Exception as exc:
            if _code(exc) == "InvalidRange":  # the range starts past the object's end: too short an object
                return b"", self._size_of(name)
            raise self._error(exc, f"GET {name}") from None
        return data, int(result.meta["size"])

    def get(self, name: str) -> Any | None:
        """The whole of object ``name`` (a buffer), or None if it does not exist."""
        try:
            return self._obstore.get(self._store, name).bytes()
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._error(exc, f"GET {name}") from None

    def _size_of(self, name: str) -> int:
        try:
            return int(self._obstore.head(self._store, name)["size"])
        except FileNotFoundError:
            return 0
        except Exception as exc:
            raise self._error(exc, f"HEAD {name}") from None

    def head(self, name: str) -> int | None:
        """The size of object ``name``, or None if it does not exist."""
        try:
            return int(self._obstore.head(self._store, name)["size"])
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._error(exc, f"HEAD {name}") from None

    def put(self, name: str, data: Any) -> None:
        """Store ``data`` (a buffer) as object ``name``, replacing it whole (S3 PUTs are atomic)."""
        if self.fence is not None:
            self.fence()
        try:
            self._obstore.put(self._store, name, data, use_multipart=False)
        except Exception as exc:
            raise self._error(exc, f"PUT {name}") from None

    def delete(self, names: Sequence[str]) -> None:
        """Delete the objects (DeleteObjects, up to 1000 a request); names that do not exist are no error."""
        if not names:
            return
        if self.fence is not None:
            self.fence()
        try:
            self._obstore.delete(self._store, list(names))
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self._error(exc, f"DELETE {names[0]} (+{len(names) - 1})") from None

    def check_bucket(self, prefix: str) -> None:
        """Raise StoreError unless the bucket exists and the credentials may list ``prefix`` (one request):
        asked before anything is written, since some stores create a missing bucket on a PUT."""
        try:
            for _ in self._obstore.list(self._store, prefix, chunk_size=1):
                break
        except Exception as exc:
            raise self._error(exc, f"LIST {prefix}") from None

    # Conditional calls: the lease's (never fenced) and the dirty bitmaps' (fenced like every other write).

    def put_if(self, name: str, data: bytes, etag: str | None, *, fenced: bool = True) -> str | None:
        """Store ``data`` as ``name`` only if the object is still as last seen: absent (``etag`` None: a PUT
        with If-None-Match: *) or with ``etag`` (If-Match). The new ETag, or None when the condition failed
        (HTTP 412, or the object is gone) and the object does not hold ``data`` (a retry of a PUT that had in
        fact succeeded fails its condition: the object then holds ``data``, which counts as success).
        ``fenced``: checked against the image's lease first, as every write of the image's objects is; the
        lease's own calls are not (they are how a server learns whether it may write)."""
        if fenced and self.fence is not None:
            self.fence()
        mode: Any = "create" if etag is None else {"e_tag": etag}
        exceptions = self._obstore.exceptions
        try:
            result = self._obstore.put(self._store, name, data, mode=mode, use_multipart=False)
        except (exceptions.AlreadyExistsError, exceptions.PreconditionError, FileNotFoundError):
            found = self.get_tagged(name)
            return found[1] if found is not None and found[0] == data else None
        except Exception as exc:
            raise self._error(exc, f"PUT {name}") from None
        tag = result["e_tag"]
        if not tag:
            raise StoreError(errno.ENOTSUP, f"PUT {name}: the store answered without an ETag")
        return str(tag)

    def get_tagged(self, name: str) -> tuple[bytes, str] | None:
        """The whole of object ``name`` and its ETag, or None if it does not exist."""
        try:
            result = self._obstore.get(self._store, name)
            return bytes(result.bytes()), str(result.meta["e_tag"])
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._error(exc, f"GET {name}") from None

    def remove(self, name: str) -> None:
        """Delete object ``name`` (gone already is no error)."""
        try:
            self._obstore.delete(self._store, name)
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self._error(exc, f"DELETE {name}") from None

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(name, size) of every object whose name starts with the path ``prefix`` (ending in "/")."""
        try:
            for chunk in self._obstore.list(self._store, prefix, chunk_size=1000):
                for meta in chunk:
                    yield meta["path"], int(meta["size"])
        except Exception as exc:
            raise self._error(exc, f"LIST {prefix}") from None

    def _error(self, exc: BaseException, what: str) -> StoreError:
        code = _code(exc)
        text = _one_line(exc)
        if code == "NoSuchBucket":
            return StoreError(errno.ENOENT, f"bucket {self.bucket!r} does not exist ({what})")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken") or (
            code is None and isinstance(exc, PermissionError | self._obstore.exceptions.PermissionDeniedError)
        ):
            how = "the credentials" if self.signed else "anonymous access (no credentials found in the AWS chain)"
            return StoreError(errno.EACCES, f"{what}: the store refused {how} ({code or text})")
        if code is None and isinstance(exc, self._obstore.exceptions.UnauthenticatedError):
            return StoreError(errno.EACCES, f"{what}: the store refused the credentials ({text})")
        if _TIMED_OUT.search(str(exc)):
            return StoreError(errno.ETIMEDOUT, f"{what}: timed out: {text}")
        where = f" at {self.endpoint}" if self.endpoint and code is None else ""
        return StoreError(errno.EIO, f"{what}{where}: {code or text}")


def _code(exc: BaseException) -> str | None:
    match = _CODE.search(str(exc))
    return match.group(1) if match else None


def _one_line(exc: BaseException) -> str:
    """The gist of obstore's long error text: the HTTP status or the transport error, and the retries made."""
    full = str(exc).strip()
    first = full.splitlines()[0] if full else type(exc).__name__
    status = _STATUS.search(first)
    if status:
        return f"HTTP {status.group(1).strip()}"
    retries = _RETRIES.search(first)
    gist = first.rsplit(" - ", 1)[-1].strip() if " - " in first else first
    if retries:
        gist = f"{gist} (after {retries.group(1)} retries)"
    return gist[:300]
