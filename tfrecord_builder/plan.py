"""The plan of a build: images → shard tasks, deterministic whatever the number of workers.

Images (sorted IDs, the first ``limit`` of them) are sorted by (fold, ID) and cut into groups of
``images_per_shard`` images within each fold; group ``k`` of fold ``f`` becomes the shard
``fold{f}-{k:05d}-n{count}.tfrec``. The group size comes from ``--shard-mb`` via an estimate of
the bytes per cell (``estimate_images_per_shard``) or is given explicitly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: Estimated serialised bytes per crop pixel (S²), measured on synthetic 2048 px fields at
#: 512 px crops (PNG level 1: ~520 kB per cell; JPEG q90: ~135 kB; both include the mask PNG).
BYTES_PER_CROP_PIXEL: dict[str, float] = {"png": 2.0, "jpeg": 0.55}
#: Estimated cells per field (HPA fields hold ~10-60 cells; synthetic 2048 px ones ~33).
CELLS_PER_FIELD: int = 30


@dataclass(frozen=True)
class ShardTask:
    """One group of images that becomes one shard (all in ``fold``)."""

    fold: int
    index: int
    image_ids: tuple[str, ...]
    labels: tuple[tuple[int, ...], ...]  # class ids per image, same order
    sources: tuple[str | None, ...] = ()  # per image, same order (None or absent: the build's --source)

    def source(self, k: int) -> str | None:
        """The source of the ``k``-th image from the label file (None: the build's default)."""
        return self.sources[k] if k < len(self.sources) else None

    @property
    def stem(self) -> str:
        """``fold{f}-{index:05d}``: the shard name without its count; also the sidecar's name."""
        return f"fold{self.fold}-{self.index:05d}"

    def identity(self) -> dict:
        """What a sidecar records to say which task it belongs to."""
        return {"fold": self.fold, "index": self.index, "image_ids": list(self.image_ids)}


def estimate_images_per_shard(
    shard_mb: float, crop_size: int, encoding: str, cells_per_field: int = CELLS_PER_FIELD
) -> int:
    """Images per shard so that a shard holds about ``shard_mb`` MB (at least 1).

    Uses ``BYTES_PER_CROP_PIXEL[encoding] * crop_size² * cells_per_field`` bytes per field.
    """
    if encoding not in BYTES_PER_CROP_PIXEL:
        raise ValueError(f"unknown encoding {encoding!r}: expected one of {tuple(BYTES_PER_CROP_PIXEL)}")
    if shard_mb <= 0:
        raise ValueError(f"shard_mb must be > 0, got {shard_mb}")
    per_field = BYTES_PER_CROP_PIXEL[encoding] * crop_size * crop_size * cells_per_field
    return max(1, int(shard_mb * 1e6 // per_field))


def plan_shards(
    image_ids: Sequence[str], folds: Mapping[str, int], labels: Mapping[str, Sequence[int]], images_per_shard: int,
    sources: Mapping[str, str] | None = None,
) -> list[ShardTask]:
    """Cut the images, sorted by (fold, ID), into groups of ``images_per_shard`` within each fold.

    ``sources``: per-image source names from the label file (``hpa_tf.io.read_sources``); images
    without one get the build's ``--source``.
    """
    if images_per_shard < 1:
        raise ValueError(f"images_per_shard must be >= 1, got {images_per_shard}")
    by_fold: dict[int, list[str]] = {}
    for image_id in sorted(image_ids):
        by_fold.setdefault(int(folds[image_id]), []).append(image_id)
    tasks = []
    for fold in sorted(by_fold):
        ids = by_fold[fold]
        for index, start in enumerate(range(0, len(ids), images_per_shard)):
            group = tuple(ids[start : start + images_per_shard])
            tasks.append(ShardTask(fold, index, group, tuple(tuple(int(c) for c in labels[i]) for i in group),
                                   tuple((sources or {}).get(i) for i in group)))
    return tasks
