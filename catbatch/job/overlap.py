"""What runs beside the pipeline call: a bounded thread pool, and a batch's images handed from
the pipeline's thread to a pool thread on the device where they are.

A worker's thread runs pipeline calls back to back; the batches' PNG encoding, CLIP scoring, row
building and the shards' Parquet writes run in :class:`BoundedPool` threads. ``submit`` blocks
while the pool holds its limit of unfinished jobs, so a pool that falls behind slows the
pipeline instead of piling up images.

On CUDA the images stay on the device (:class:`DeviceImages`): a pool thread works on them on a
side stream that waits for the pipeline's stream to have made them (an event), so its kernels
(quantizing, CLIP) do not queue behind the next pipeline call's, and the 8-bit images cross to
the host once per batch. On the CPU the same code runs without streams.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


class BoundedPool:
    """``threads`` threads that hold at most ``limit`` unfinished jobs (``submit`` waits)."""

    def __init__(self, threads: int, limit: int, name: str):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._slots = threading.BoundedSemaphore(limit)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        self._slots.acquire()
        try:
            future = self._pool.submit(fn, *args)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


_local = threading.local()


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """This thread's own CUDA stream on ``device``."""
    streams = _local.__dict__.setdefault("streams", {})
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


@dataclass
class DeviceImages:
    """A batch's images as the pipeline returned them (``(B, 3, H, W)`` in [0, 1], on its
    device) and, on CUDA, the event that marks them made on the pipeline's stream."""

    images: torch.Tensor
    ready: torch.cuda.Event | None = None

    @classmethod
    def handoff(cls, images: torch.Tensor) -> DeviceImages:
        """Called by the pipeline's thread right after the call (records the event)."""
        ready = None
        if images.is_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(images.device))
        return cls(images, ready)

    @contextmanager
    def on_side_stream(self) -> Iterator[None]:
        """For the pool thread: its work on the images goes to its own stream, after them."""
        if self.ready is None:
            yield
            return
        stream = _side_stream(self.images.device)
        stream.wait_event(self.ready)
        self.images.record_stream(stream)  # not reused by the allocator before we are done
        with torch.cuda.stream(stream):
            yield

    def finite(self) -> list[bool]:
        """Per image: no NaN or inf pixel (a small copy to the host)."""
        return torch.isfinite(self.images).flatten(1).all(1).tolist()

    def quantized(self) -> torch.Tensor:
        """As the stored PNG, on the device: ``round(clip(x, 0, 1) * 255)`` in float32, as
        uint8 ``(B, 3, H, W)`` (the same bytes as diffusers' ``numpy`` output quantized)."""
        return (self.images.float().clamp(0.0, 1.0) * 255).round().to(torch.uint8)


def to_host(quantized: torch.Tensor) -> Any:
    """``(B, H, W, 3)`` uint8 numpy images: the one copy of the batch to the host."""
    return quantized.permute(0, 2, 3, 1).contiguous().cpu().numpy()
