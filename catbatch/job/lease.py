"""A lease on an output location: two submissions never write the same output at once.

Each acquisition creates ``OUTPUT/.lease/<generation>.json`` (ten digits) one past the highest
generation there, with an exclusive create (``link(2)`` locally, ``If-None-Match: *`` on S3),
so of two drivers racing for the same generation exactly one wins. The highest generation is
the lease. Its holder rewrites it every ``heartbeat_s`` (``renewed_at``); it is free when marked
``released``, when not renewed for ``ttl_s`` (its driver died), or at once when its driver
ran on this machine (same host name and boot id; Linux) and that process is gone. A newer
generation supersedes it: the old holder sees that on its next heartbeat and sets
:attr:`Lease.lost`. Older generations are deleted by the next holder; the top one is kept, so
generations only grow.

Commits are fenced by the generation: a worker started under generation ``g`` re-reads the
lease generations right before it writes a shard's stats file, the commit marker
(:func:`check_generation`), and does not commit when a newer one exists. What remains: an
orphan that passed the check just before a new driver took the lease still writes its stats
file (it matches the orphan's own complete Parquet file of the same prompts and seeds); and the
Parquet file, written before the check, can replace a newer commit's, which then no longer
matches its stats: resume and ``status`` report that shard damaged and it is made again.

Staleness compares the holder's clock with the acquirer's: hosts must agree to well within the
TTL (30 s by default; ``CATBATCH_LEASE_TTL_S`` and ``CATBATCH_LEASE_HEARTBEAT_S`` change it).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from catbatch.job.layout import OutputLayout

LEASE_DIR = ".lease"
TTL_ENV = "CATBATCH_LEASE_TTL_S"
HEARTBEAT_ENV = "CATBATCH_LEASE_HEARTBEAT_S"
DEFAULT_TTL_S = 30.0
DEFAULT_HEARTBEAT_S = 10.0
ACQUIRE_TRIES = 5

log = logging.getLogger(__name__)


class LeaseHeld(RuntimeError):
    """Another live submission holds the output's lease."""


class LeaseLost(RuntimeError):
    """A newer lease generation exists: the writer's submission no longer owns the output."""


@dataclass
class LeaseInfo:
    """The content of one lease file."""

    generation: int
    token: str
    host: str
    pid: int
    acquired_at: float
    renewed_at: float
    ttl_s: float
    released: bool = False
    boot_id: str = ""  # with host and pid_start: tells a dead local driver from a live one
    pid_start: str = ""

    def live(self, now: float | None = None) -> bool:
        """Held: not released, renewed within the TTL and not known dead."""
        now = time.time() if now is None else now
        fresh = not self.released and now - self.renewed_at <= self.ttl_s
        return fresh and not self.dead_here()

    def dead_here(self) -> bool:
        """True when the holder ran on this machine (since its last boot) and has exited."""
        if not self.boot_id or self.host != socket.gethostname() or self.boot_id != _boot_id():
            return False
        return _process_start(self.pid) != self.pid_start

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        return (
            f"held by pid {self.pid} on {self.host} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(self.acquired_at))}, "
            f"renewed {max(0.0, now - self.renewed_at):.0f} s ago (expires after {self.ttl_s:g} s "
            "without renewal)"
        )


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" if no such process)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _file_name(generation: int) -> str:
    return f"{generation:010d}.json"


def generations(layout: OutputLayout) -> list[int]:
    """Lease generations present, ascending."""
    names = layout.list_names(LEASE_DIR)
    return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())


def read_lease(layout: OutputLayout, generation: int) -> LeaseInfo | None:
    try:
        data = layout.read_json(layout.path(LEASE_DIR, _file_name(generation)))
        return None if data is None else LeaseInfo(**data)
    except (ValueError, TypeError):  # unreadable: treat as held by someone we cannot name
        return LeaseInfo(generation, "?", "?", 0, time.time(), time.time(), DEFAULT_TTL_S)


def current_lease(layout: OutputLayout) -> LeaseInfo | None:
    """The top lease record (live or not), or None when the output never had one."""
    gens = generations(layout)
    return read_lease(layout, gens[-1]) if gens else None


def check_generation(layout: OutputLayout, generation: int) -> None:
    """Raise :class:`LeaseLost` unless ``generation`` is still the output's newest lease."""
    gens = generations(layout)
    newest = gens[-1] if gens else None
    if newest != generation:
        raise LeaseLost(
            f"the lease on {layout.display()} is at generation {newest}, not {generation}: "
            "another submission owns the output"
        )


def ensure_free(layout: OutputLayout) -> None:
    """Raise :class:`LeaseHeld` when a live submission holds the output's lease.

    A look, not a claim (:meth:`Lease.acquire` decides): it lets a second submission stop at
    once, before it reads prompts or loads anything."""
    holder = current_lease(layout)
    if holder is not None and holder.live():
        raise LeaseHeld(_held_message(layout, holder))


class Lease:
    """Exclusive right to write one output; use as a context manager or acquire()/release()."""

    def __init__(
        self,
        layout: OutputLayout,
        ttl_s: float | None = None,
        heartbeat_s: float | None = None,
    ):
        self.layout = layout
        self.ttl_s = float(ttl_s if ttl_s is not None else os.environ.get(TTL_ENV, DEFAULT_TTL_S))
        hb = heartbeat_s if heartbeat_s is not None else os.environ.get(HEARTBEAT_ENV)
        self.heartbeat_s = float(hb) if hb is not None else min(DEFAULT_HEARTBEAT_S, self.ttl_s / 3)
        if not 0 < self.heartbeat_s < self.ttl_s:
            raise ValueError("the lease heartbeat must be positive and shorter than its TTL")
        self.token = uuid.uuid4().hex
        self.info: LeaseInfo | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- public -----------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lease or raise :class:`LeaseHeld` naming the live holder."""
        for _ in range(ACQUIRE_TRIES):
            gens = generations(self.layout)
            top = gens[-1] if gens else 0
            holder = read_lease(self.layout, top) if top else None
            if holder is not None and holder.live():
                raise self._held(holder)
            if top and holder is None:
                continue  # deleted while we looked: someone newer is cleaning up
            gen = top + 1
            now = time.time()
            pid = os.getpid()
            info = LeaseInfo(gen, self.token, socket.gethostname(), pid, now, now, self.ttl_s)
            info.boot_id, info.pid_start = _boot_id(), _process_start(pid)
            if not self.layout.create_exclusive(self._path(gen), _encode(info)):
                winner = read_lease(self.layout, gen)
                if winner is None or winner.token != self.token:
                    continue  # lost the race; the next look names the winner
            if any(g > gen for g in generations(self.layout)):
                self.layout.remove(self._path(gen))  # a stale view: someone is already newer
                continue
            self.info = info
            for g in gens:
                self.layout.remove(self._path(g))
            self._start_heartbeat()
            log.info("lease %s acquired on %s", gen, self.layout.display())
            return
        top_info = current_lease(self.layout)
        raise self._held(top_info) if top_info else LeaseHeld("lease contention; try again")

    def renew(self) -> bool:
        """Refresh ``renewed_at``; False (and :attr:`lost` set) if a newer lease superseded ours."""
        if self.info is None or self.lost.is_set():
            return False
        if any(g > self.info.generation for g in generations(self.layout)):
            self.lost.set()
            log.error("lease on %s was taken over by another submission", self.layout.display())
            return False
        self.info.renewed_at = time.time()
        self.layout.write_bytes(self._path(self.info.generation), _encode(self.info))
        return True

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released (unless it was lost)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.heartbeat_s * 2))
            self._thread = None
        if self.info is None:
            return
        try:
            if not self.lost.is_set() and not any(
                g > self.info.generation for g in generations(self.layout)
            ):
                self.info.released = True
                self.layout.write_bytes(self._path(self.info.generation), _encode(self.info))
        except Exception as e:  # noqa: BLE001 - never hide the run's own outcome
            log.warning("could not release the lease (it expires after %g s): %s", self.ttl_s, e)
        finally:
            self.info = None

    @property
    def held(self) -> bool:
        return self.info is not None and not self.lost.is_set()

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- internals --------------------------------------------------------------------------
    def _path(self, generation: int) -> str:
        return self.layout.path(LEASE_DIR, _file_name(generation))

    def _held(self, holder: LeaseInfo) -> LeaseHeld:
        return LeaseHeld(_held_message(self.layout, holder))

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="catbatch-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.renew():
                    return
            except Exception as e:  # noqa: BLE001 - keep trying; expiry is the safety net
                log.warning("lease heartbeat failed: %s: %s", type(e).__name__, e)


def _held_message(layout: OutputLayout, holder: LeaseInfo) -> str:
    return (
        f"{layout.display()} is being written by another submission (lease "
        f"{holder.describe()}); try again when it ends, or after the lease expires if that "
        "driver died"
    )


def _encode(info: LeaseInfo) -> bytes:
    return (json.dumps(asdict(info), sort_keys=True) + "\n").encode()
