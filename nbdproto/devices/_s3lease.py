"""The lease that makes one server at a time the writer of an S3 image.

Two servers writing one image lose each other's writes: each keeps its own allocation map and per-object
locks, so their read-modify-writes of one object interleave. So a writable image is leased: an object beside
it, ``KEY/lease`` (outside the ``KEY/%016x`` layout, so nbdkit's S3 plugin and our listing pass it over),
names the holder (host, pid, since when, and a random token) and the time its lease expires.

- **Taking it**: a PUT with If-None-Match: * creates the lease; the store answers 412 when one exists. A lease
  whose expiry has passed is taken over with If-Match on the ETag just read, so of two servers taking over
  at once one wins and the other finds the winner's lease. A lease that has not expired is refused
  (``S3LeaseHeld``: the holder and the expiry, in one line).
- **Keeping it**: the holder rewrites the lease with If-Match on the ETag of its last write, a third of its
  write window after each renewal. A 412 there means someone else wrote the lease: it is lost (unless the
  lease still carries our token, which is our own renewal that the store took on a retry).
- **Writing under it**: every PUT and DELETE of the image's objects asks ``check`` first, and so does every
  write the device acknowledges. A write may start only while it will end before anyone can take over: the
  holder's window after a renewal sent at time T (its own clock) ends at T + duration - (the longest a store
  call may take) - CLOCK_SKEW, and the lease it wrote says it expires at T + duration on its wall clock. Once
  the window closes without a renewal, or a renewal finds the lease taken, the lease is lost for good: every
  write fails with EIO and nothing is written again, so two writers' data never interleave.
- **Letting go**: a clean close deletes the lease (after checking it is still ours), so the next writer
  starts at once; after a crash it starts once the lease has expired.

What it assumes (docs/howto/s3-sharing.md says it for users): the servers' wall clocks agree within
CLOCK_SKEW (NTP); the holder's clock (CLOCK_BOOTTIME, which counts time stopped or suspended) does not run
slow; a request reaches the store within the call limit of being started. A server frozen between ``check``
and sending its request (a stopped process, a paused VM) for longer than its window can still send that one
request late: only conditional writes of the data objects themselves could refuse it, which S3 cannot do
for deletes, so this lease, like any lease without a fencing token at the store, cannot rule that out.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

from ._s3store import ObjectStore, StoreError

__all__ = ["CLOCK_SKEW", "Lease", "S3LeaseHeld", "lease_name", "lease_duration", "minimum_lease"]

log = logging.getLogger("nbdproto.devices.s3")

CLOCK_SKEW = 1.0
"""Seconds by which the wall clocks of servers sharing an image may differ (NTP keeps them far closer)."""
_WINDOW_AT_LEAST = 1.0
"""The shortest write window after a renewal that a lease may leave (see ``minimum_lease``)."""
_TAKE_TRIES = 5


def lease_name(key: str) -> str:
    """The object that holds the lease of the image at ``key``."""
    return f"{key}/lease"


def minimum_lease(call_limit: float) -> float:
    """The shortest lease for store calls of up to ``call_limit`` seconds: a write started just before the
    window closes must end before the lease can expire, with CLOCK_SKEW to spare, and the window must stay
    open a little after each renewal."""
    return call_limit + CLOCK_SKEW + _WINDOW_AT_LEAST


def lease_duration(asked: float | None, call_limit: float) -> float:
    """The lease for store calls of up to ``call_limit`` seconds: ``asked``, or by default twice the call limit
    (60 s for calls of 30 s: renewing every third of the window leaves room for two renewals to fail before
    it closes). ValueError for one shorter than ``minimum_lease``."""
    duration = max(2 * call_limit, minimum_lease(call_limit)) if asked is None else asked
    if duration < minimum_lease(call_limit):
        raise ValueError(
            f"a lease of {duration:g} s is too short for store calls of up to {call_limit:g} s (the remote "
            f"timeout): a write must end before the lease can expire; give at least {minimum_lease(call_limit):g} s"
        )
    return duration


def _boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


_clock = _boottime if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic
"""The holder's clock: CLOCK_BOOTTIME (Linux) counts the time a machine was suspended, which CLOCK_MONOTONIC
does not: a suspended holder must find its window closed when it wakes."""


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


class S3LeaseHeld(StoreError):
    """Another server holds the image's lease (EBUSY); the message names it and when the lease expires."""


def _describe(holder: dict[str, Any]) -> str:
    """The holder as a lease names it (another server's, so read with care)."""
    since = holder.get("since")
    when = f" (since {_utc(since)})" if isinstance(since, int | float) else ""
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}{when}"


class Lease:
    """The lease of the image ``image`` (its s3:// URI, for messages) at ``key`` in ``store``: ``duration``
    seconds from each renewal, for store calls of up to ``call_limit`` seconds. ValueError for a duration
    below ``minimum_lease(call_limit)``."""

    def __init__(self, store: ObjectStore, image: str, key: str, duration: float, call_limit: float) -> None:
        lease_duration(duration, call_limit)
        self._store = store
        self._image = image
        self._name = lease_name(key)
        self._duration = duration
        self._guard = call_limit + CLOCK_SKEW
        self._renew_every = max(0.1, (duration - self._guard) / 3)
        self._holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        self._token = secrets.token_hex(16)
        self._lock = threading.Lock()
        self._etag = ""
        self._window_end = 0.0
        self._lost: str | None = "not taken yet"
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def name(self) -> str:
        """The lease object's name."""
        return self._name

    # --- Taking ---------------------------------------------------------------------------------------------

    def _body(self, now: float) -> bytes:
        expires = now + self._duration
        content = {
            "nbdproto-lease": 1,
            "image": self._image,
            "holder": self._holder,
            "token": self._token,
            "expires": expires,
            "expires_utc": _utc(expires),
        }
        return json.dumps(content, sort_keys=True).encode()

    def acquire(self) -> None:
        """Take the lease (create it, or take over an expired one) and start renewing it. S3LeaseHeld when
        another server holds it; StoreError when the store fails."""
        etag: str | None = None  # None: create it
        for _ in range(_TAKE_TRIES):
            sent = _clock()
            body = self._body(time.time())
            taken = self._store.put_if(self._name, body, etag, fenced=False)
            if taken is not None:
                self._took(taken, sent, previous=etag)
                return
            found = self._store.get_tagged(self._name)
            if found is None:
                etag = None  # released meanwhile: create it
                continue
            data, etag = found
            other = _parse(data)
            if other is None:
                raise S3LeaseHeld(
                    errno.EBUSY,
                    f"{self._name} exists but is not a lease this server can read: remove it if no server writes "
                    "the image",
                    self._image,
                )
            if other.get("token") == self._token and data == body:  # ours: a retry of our PUT found it
                self._took(etag, sent, previous=None)
                return
            expires = float(other.get("expires", 0))
            left = expires - time.time()
            if left > 0:
                raise S3LeaseHeld(
                    errno.EBUSY,
                    f"the image is leased to another writer, {_describe(other.get('holder', {}))}, until "
                    f"{_utc(expires)} ({left:.0f} s from now): open it read-only, or again once the lease has "
                    "expired",
                    self._image,
                )
            # Expired: take it over with If-Match, so that of two servers doing so one wins.
        raise S3LeaseHeld(
            errno.EBUSY, "the image's lease kept changing hands while this server tried to take it", self._image
        )

    def _took(self, etag: str, sent: float, previous: str | None) -> None:
        with self._lock:
            self._etag = etag
            self._window_end = sent + self._duration - self._guard
            self._lost = None
        if previous is not None:
            log.warning("%s: took over the expired lease (%s)", self._image, self._name)
        self._renewer = threading.Thread(target=self._renew_loop, name="s3-lease", daemon=True)
        self._renewer.start()

    # --- Keeping --------------------------------------------------------------------------------------------

    def check(self) -> None:
        """Return if this server may start a write to the store now; OSError (EIO) saying why not otherwise
        (``ObjectStore.fence``, and the device before it acknowledges a write)."""
        if self._lost is None and _clock() < self._window_end:
            return
        with self._lock:
            if self._lost is None:
                self._lose(f"it was not renewed in time (within {self._duration - self._guard:g} s)")
            lost = self._lost
        raise OSError(
            errno.EIO, f"{self._image}: this server no longer holds the image's lease ({lost}): writes are refused"
        )

    def _lost_already(self) -> bool:
        return self._lost is not None

    def _lose(self, why: str) -> None:
        """The lease is lost for good (with the lock held)."""
        self._lost = why
        log.error("%s: lost the lease: %s; this server writes nothing more, and writes get EIO", self._image, why)

    def _renew_loop(self) -> None:
        wait = self._renew_every
        while not self._stop.wait(wait):
            outcome = self._renew()
            if outcome is None:
                return
            wait = self._renew_every if outcome else min(self._renew_every, 1.0)

    def _renew(self) -> bool | None:
        """One renewal: True when it succeeded, False when it failed and may be tried again, None when the
        lease is lost."""
        sent = _clock()
        with self._lock:
            if self._lost is not None:
                return None
            if sent >= self._window_end:
                self._lose(f"it could not be renewed within {self._duration - self._guard:g} s")
                return None
            etag = self._etag
        body = self._body(time.time())
        try:
            renewed = self._store.put_if(self._name, body, etag, fenced=False)
            found = None if renewed is not None else self._store.get_tagged(self._name)
        except OSError as exc:  # the store failed or timed out: again soon, while the window is open
            log.warning("%s: renewing the lease failed: %s", self._image, exc.strerror or exc)
            return False
        with self._lock:
            if self._lost_already():  # (lost while the store answered: a closed window, a release)
                return None
            if renewed is not None:
                self._etag = renewed
                self._window_end = sent + self._duration - self._guard
                return True
            other = _parse(found[0]) if found is not None else None
            if found is not None and other is not None and other.get("token") == self._token:
                # Still ours: one of our renewals the store took although we did not hear it. Its expiry may be
                # older than this one's, so the window stays as it is; the next renewal uses its ETag.
                self._etag = found[1]
                return False
            if found is None:
                self._lose("the lease object was deleted")
            elif other is None:
                self._lose("the lease object was overwritten with something else")
            else:
                self._lose(f"it was taken over by {_describe(other.get('holder', {}))}")
            return None

    # --- Letting go -----------------------------------------------------------------------------------------

    def release(self) -> None:
        """Stop renewing, and delete the lease if this server still holds it (a clean exit: the next writer
        need not wait for it to expire). A store that fails here leaves it to expire (logged)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()  # its call is bounded by the call limit
        with self._lock:
            held = self._lost is None and _clock() < self._window_end
            self._lost = self._lost or "released"
        if not held:
            return
        try:
            found = self._store.get_tagged(self._name)
            if found is not None and (_parse(found[0]) or {}).get("token") == self._token:
                self._store.remove(self._name)
        except OSError as exc:
            log.warning("%s: could not remove the lease; it expires by itself: %s", self._image, exc.strerror or exc)


def _parse(data: bytes) -> dict[str, Any] | None:
    """A lease's content, or None for an object that is not one of ours."""
    try:
        content = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(content, dict) or content.get("nbdproto-lease") != 1:
        return None
    if not isinstance(content.get("holder"), dict) or not isinstance(content.get("expires"), int | float):
        return None
    return content
