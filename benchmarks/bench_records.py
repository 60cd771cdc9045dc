"""Bytes per 512 px crop and encode/decode time: PNG (zlib levels) vs JPEG (qualities), on a procedural crop.

    python benchmarks/bench_records.py

Each row: the serialised example's size, ``hpa_tf.records.encode_example`` time, eager
``parse_example`` (parse + decode) time, and the mean absolute pixel error of the round trip.
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from hpa_tf.records import encode_example, parse_example  # noqa: E402


def procedural_crop(size: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An HPA-like (size, size, 4) uint8 RGBY crop of one cell and its 0/255 mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = size / 2
    r = np.hypot((yy - c) / 0.8, (xx - c))
    cell = cv2.GaussianBlur((r < size * 0.38).astype(np.float32), (0, 0), 6)
    nucleus = cv2.GaussianBlur((np.hypot(yy - c, xx - c * 1.05) < size * 0.15).astype(np.float32), (0, 0), 4)

    def texture(sigma: float, scale: float) -> np.ndarray:
        n = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), sigma)
        return np.clip(n / n.std() * scale, 0, None)

    red = cell * (40 + 60 * texture(2, 1))  # microtubule-ish fine texture
    green = cell * (10 + 80 * texture(3, 1) ** 2)  # punctate protein
    blue = nucleus * (120 + 40 * texture(5, 0.5))  # nucleus
    yellow = cell * (50 + 40 * texture(8, 1))  # ER
    planes = [p + rng.poisson(3, (size, size)) for p in (red, green, blue, yellow)]  # camera noise + offset
    return np.clip(np.stack(planes, -1), 0, 255).astype(np.uint8), (cell > 0.5).astype(np.uint8) * 255


def main() -> None:
    crop, mask = procedural_crop()
    args = dict(labels=[0, 16], image_id="x", cell_id=1, bbox=(0, 0, 400, 400), image_size=(2048, 2048))
    print(f"crop 512x512x4 raw = {crop.nbytes} bytes; mask PNG = {len(cv2.imencode('.png', mask)[1])} bytes")
    for enc, kw in [("png", dict(png_compression=1)), ("png", dict(png_compression=3)), ("png", dict(png_compression=6)),
                    ("jpeg", dict(jpeg_quality=95)), ("jpeg", dict(jpeg_quality=90)), ("jpeg", dict(jpeg_quality=80))]:
        n = 20
        t = time.perf_counter()
        for _ in range(n):
            ser = encode_example(crop, mask, encoding=enc, **args, **kw)
        t_enc = (time.perf_counter() - t) / n * 1000
        x = tf.constant(ser)
        parse_example(x)
        t = time.perf_counter()
        for _ in range(n):
            out = parse_example(x)
        t_dec = (time.perf_counter() - t) / n * 1000
        err = np.abs(out["image"].numpy().astype(float) - crop).mean()
        print(f"{enc:4s} {kw}: example {len(ser) / 1024:7.1f} KiB, encode {t_enc:5.1f} ms, "
              f"eager parse+decode {t_dec:5.1f} ms, MAE {err:.2f}")


if __name__ == "__main__":
    main()
