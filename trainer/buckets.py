"""Aspect-ratio buckets: which size each image trains at, and batches drawn within one bucket.

A portrait photo centre-cropped to a square loses its forehead and chin; in a bucket it keeps its
shape. The rules are sd-scripts' (``library/train_util.py`` ``BucketManager``,
``library/model_util.py`` ``make_bucket_resolutions``), so a file's ``ss_bucket_info`` means what
kohya users expect:

* **Candidate buckets** (:func:`bucket_resolutions`): every ``(w, h)`` with sides on the 64-pixel
  grid between the shortest and longest side, ``h`` the largest that keeps ``w·h`` within the
  training area ``resolution²``, both orientations, plus the square ``resolution × resolution``
  (which is exact even when the resolution is not a multiple of 64, so square data trains at
  exactly the size it trains at without buckets).
* **Choice** (:func:`select_bucket`): the candidate whose aspect ratio is nearest the image's (the
  first in sorted order on a tie); the image is then scaled to cover the bucket and centre-cropped
  (``PIL.ImageOps.fit``, the same call the square crop uses). With ``no_upscale`` an image gets a
  bucket of its own size rounded down to the grid, downscaled only when it exceeds the area.
* **Batches** (:class:`BucketBatchOrder`): each epoch every bucket's images are shuffled and cut
  into chunks of ``batch_size × world`` (a short last chunk is filled by wrapping around the same
  bucket), and the chunks are shuffled; rank ``r`` takes slice ``r`` of a chunk, so every rank's
  micro-batch comes from the same bucket. All of it is a function of (seed, micro-batch index):
  a resumed run needs nothing but the step. When every image lands in one bucket (square face
  crops) the loop keeps its unbucketed order, so buckets on or off give the same bytes there.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Iterator

BUCKET_STEP = 64  # sd-scripts' --bucket_reso_steps default

Size = tuple[int, int]  # (width, height) in pixels


def bucket_resolutions(resolution: int, min_side: int, max_side: int, step: int = BUCKET_STEP) -> list[Size]:
    """The candidate buckets for a training resolution, sorted by (width, height)."""
    area = resolution * resolution
    resos: set[Size] = {(resolution, resolution)}
    width = min_side
    while width <= max_side:
        height = min(max_side, (area // width) // step * step)
        if height >= min_side:
            resos.add((width, height))
            resos.add((height, width))
        width += step
    return sorted(resos)


def _round_to_step(x: float, step: int) -> int:
    x = int(x + 0.5)
    return x - x % step


def select_bucket(width: int, height: int, resos: Sequence[Size], *, no_upscale: bool = False,
                  max_area: int | None = None, step: int = BUCKET_STEP) -> tuple[Size, float]:
    """``(bucket, aspect-ratio error)`` for an image of ``width × height`` (sd-scripts' rules)."""
    ar = width / height
    if not no_upscale:
        if (width, height) in resos:
            bucket = (width, height)
        else:
            errors = [abs(w / h - ar) for w, h in resos]
            bucket = tuple(resos[errors.index(min(errors))])
    else:
        assert max_area is not None
        if width * height > max_area:  # shrink to the area, keeping the aspect ratio as well as the grid allows
            rw = math.sqrt(max_area * ar)
            rh = max_area / rw
            bw = _round_to_step(rw, step)
            bh_w = _round_to_step(bw / ar, step)
            bh = _round_to_step(rh, step)
            bw_h = _round_to_step(bh * ar, step)
            if bh_w and abs(bw / bh_w - ar) < abs((bw_h / bh if bh else math.inf) - ar):
                resized = (bw, int(bw / ar + 0.5))
            else:
                resized = (int(bh * ar + 0.5), bh)
        else:
            resized = (width, height)
        # never below one grid step: a tiny image is upscaled to the smallest bucket side instead
        bucket = (max(step, resized[0] - resized[0] % step), max(step, resized[1] - resized[1] % step))
    return (int(bucket[0]), int(bucket[1])), bucket[0] / bucket[1] - ar


@dataclass(frozen=True)
class BucketPlan:
    """The training size of every image (same order as the images) and what the metadata says."""

    sizes: tuple[Size, ...]
    enabled: bool
    ar_errors: tuple[float, ...] = ()
    min_side: int = 0
    max_side: int = 0
    no_upscale: bool = False

    @property
    def buckets(self) -> dict[Size, list[int]]:
        """``{bucket size: [image index, ...]}``, buckets sorted by size, images in dataset order."""
        out: dict[Size, list[int]] = {}
        for size in sorted(set(self.sizes)):
            out[size] = []
        for i, size in enumerate(self.sizes):
            out[size].append(i)
        return out

    def subset(self, keep: Sequence[int]) -> "BucketPlan":
        """The plan of the images at positions ``keep`` (e.g. those the latent cache could decode)."""
        return BucketPlan(tuple(self.sizes[i] for i in keep), self.enabled,
                          tuple(self.ar_errors[i] for i in keep) if self.ar_errors else (),
                          self.min_side, self.max_side, self.no_upscale)

    def info(self) -> dict[str, Any]:
        """sd-scripts' ``ss_bucket_info``: the used buckets in sorted order with their image counts,
        and the mean absolute aspect-ratio error."""
        buckets = {str(i): {"resolution": list(size), "count": len(members)}
                   for i, (size, members) in enumerate(self.buckets.items())}
        mean = float(sum(abs(e) for e in self.ar_errors) / len(self.ar_errors)) if self.ar_errors else 0.0
        return {"buckets": buckets, "mean_img_ar_error": mean}


def plan_buckets(image_sizes: Sequence[Size], resolution: int, *, enabled: bool, min_side: int, max_side: int,
                 no_upscale: bool = False) -> BucketPlan:
    """Assign every image (its upright ``(width, height)``) a training size."""
    if not enabled:  # every image centre-cropped to the square; sd-scripts still reports the crop's error
        return BucketPlan(tuple((resolution, resolution) for _ in image_sizes), False,
                          tuple(1.0 - w / h for w, h in image_sizes))
    resos = bucket_resolutions(resolution, min_side, max_side)
    chosen = [select_bucket(w, h, resos, no_upscale=no_upscale, max_area=resolution * resolution) for w, h in image_sizes]
    return BucketPlan(tuple(size for size, _ in chosen), True, tuple(err for _, err in chosen),
                      min_side, max_side, no_upscale)


def plan_for_config(config: Any, images: Sequence[Any]) -> BucketPlan:
    """The plan ``config`` asks for (``--buckets``, the side limits) over ``ImageRecord``s, whose
    ``width``/``height`` are the upright sizes :func:`.dataset.check_dataset` measured."""
    from .config import bucket_limits

    lo, hi = bucket_limits(config)
    return plan_buckets([(r.width, r.height) for r in images], config.resolution, enabled=config.buckets,
                        min_side=lo, max_side=hi, no_upscale=config.bucket_no_upscale)


# --- batch order ---------------------------------------------------------------------------------

def _generator(seed: int, *parts: Any) -> Any:
    import torch

    digest = hashlib.sha256("|".join(["facediffuser-buckets", str(seed), *map(str, parts)]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class BucketBatchOrder:
    """Which images micro-batch ``m`` of rank ``r`` trains on, all from one bucket: a function of
    (seed, m, r) only (see the module docstring). Same interface as the loop's unbucketed order."""

    def __init__(self, buckets: Sequence[Sequence[int]], batch_size: int, seed: int, *, rank: int = 0,
                 world: int = 1) -> None:
        self.buckets = [list(b) for b in buckets if b]
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.group = batch_size * world  # images per chunk: one micro-batch on every rank
        self.n = sum(len(b) for b in self.buckets)
        self.micro_batches_per_epoch = sum(math.ceil(len(b) / self.group) for b in self.buckets)
        self._epochs: dict[int, list[list[int]]] = {}

    def _chunks(self, epoch: int) -> list[list[int]]:
        import torch

        if epoch not in self._epochs:
            if len(self._epochs) > 4:
                self._epochs.clear()
            chunks: list[list[int]] = []
            for b, members in enumerate(self.buckets):
                perm = torch.randperm(len(members), generator=_generator(self.seed, "bucket", epoch, b)).tolist()
                for k in range(math.ceil(len(members) / self.group)):
                    chunks.append([members[perm[(k * self.group + i) % len(members)]] for i in range(self.group)])
            order = torch.randperm(len(chunks), generator=_generator(self.seed, "chunks", epoch)).tolist()
            self._epochs[epoch] = [chunks[i] for i in order]
        return self._epochs[epoch]

    def indices(self, m: int) -> list[tuple[int, int]]:
        """``[(epoch, image index), ...]`` of micro-batch ``m`` on this rank."""
        epoch, j = divmod(m, self.micro_batches_per_epoch)
        chunk = self._chunks(epoch)[j]
        return [(epoch, i) for i in chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]]

    def iterate(self, start: int) -> Iterator[list[tuple[int, int]]]:
        m = start
        while True:
            yield self.indices(m)
            m += 1

    def epoch(self, m: int) -> int:
        return m // self.micro_batches_per_epoch
