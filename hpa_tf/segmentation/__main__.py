"""Segment every field of a folder: ``python -m hpa_tf.segmentation --data-dir DIR --out DIR``.

Writes ``{ID}_cells.png`` and ``{ID}_nuclei.png`` (uint16 label images, shared ids) and, with
``--overlay``, ``{ID}_overlay.png`` (outlines over the RGB composite) per field. Fields whose
outputs exist are skipped unless ``--overwrite``; unreadable fields are reported and skipped, and
the exit status is 1 when any field failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hpa_tf.segmentation import BACKENDS, SEGMENTER_ERRORS, draw_overlay, get_segmenter

logger = logging.getLogger("hpa_tf.segmentation")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line (``prog``: the name its usage shows)."""
    p = argparse.ArgumentParser(
        prog=prog or "python -m hpa_tf.segmentation",
        description="Segment HPA fields of view into cells and nuclei (uint16 label PNGs, optional overlays).",
    )
    p.add_argument("--data-dir", required=True, help="folder with {ID}_{red,green,blue,yellow}.{png,jpg,tif}")
    p.add_argument("--ids", nargs="+", help="field IDs to segment (default: every field in --data-dir)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--backend", "--segmenter", dest="backend", default="builtin", choices=BACKENDS,
                   help="segmenter (default: builtin)")
    p.add_argument("--scale", type=float, default=None, help="builtin: working scale (default 0.25)")
    p.add_argument("--overlay", action="store_true", help="also write {ID}_overlay.png for a person to look at")
    p.add_argument("--overlay-size", type=int, default=1024, help="longer side of the overlays in px (default 1024)")
    p.add_argument("--nuclei-model", help="hpacellseg: local nuclei model file (never downloaded)")
    p.add_argument("--cell-model", help="hpacellseg: local 3-channel cell model file (never downloaded)")
    p.add_argument("--device", default="auto",
                   help="hpacellseg: auto (the GPU when PyTorch sees one, else the CPU), cpu, cuda or cuda:N "
                   "(default auto)")
    p.add_argument("--overwrite", action="store_true", help="redo fields whose outputs already exist")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 some field failed, 2 bad arguments)."""
    from hpa_tf.cli import quiet_tensorflow

    quiet_tensorflow()  # before anything imports TensorFlow (as the predictor does in the same process)
    from tqdm import tqdm

    from hpa_tf.io import ImageReadError, list_image_ids, read_rgby, write_label_image, write_png

    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        print(f"error: --data-dir {data_dir} is not a folder", file=sys.stderr)
        return 2
    ids = list(args.ids) if args.ids else list_image_ids(data_dir)
    if not ids:
        print(f"error: no fields ({{ID}}_{{red,green,blue,yellow}}.png|jpg|tif) in {data_dir}", file=sys.stderr)
        return 2
    options: dict = {}
    if args.backend == "builtin":
        if args.scale is not None:
            options["scale"] = args.scale
    else:
        options = {"nuclei_model": args.nuclei_model, "cell_model": args.cell_model, "device": args.device}
    try:  # before the output folder exists: a refused start leaves nothing behind
        segmenter = get_segmenter(args.backend, **options)
    except SEGMENTER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def outputs(image_id: str) -> list[Path]:
        names = [f"{image_id}_cells.png", f"{image_id}_nuclei.png"]
        if args.overlay:
            names.append(f"{image_id}_overlay.png")
        return [out / n for n in names]

    counts: list[int] = []
    seconds: list[float] = []
    failed: list[tuple[str, str]] = []
    skipped = 0
    bar = tqdm(ids, desc="segmenting", unit="field", disable=args.quiet)
    for image_id in bar:
        paths = outputs(image_id)
        if not args.overwrite and all(p.exists() for p in paths):
            skipped += 1
            continue
        try:
            image = read_rgby(data_dir, image_id)
        except (ImageReadError, OSError, ValueError) as e:
            failed.append((image_id, str(e)))
            logger.error("skipping %s: %s", image_id, e)
            continue
        t0 = time.perf_counter()
        cells, nuclei = segmenter.segment(image)
        seconds.append(time.perf_counter() - t0)
        counts.append(int(cells.max()))
        write_label_image(paths[0], cells)
        write_label_image(paths[1], nuclei)
        if args.overlay:
            rgb = draw_overlay(image, cells, nuclei, max_size=args.overlay_size)
            write_png(paths[2], rgb[..., ::-1])
        bar.set_postfix(cells=counts[-1])
    bar.close()

    done = len(counts)
    print(f"segmented {done} field(s), skipped {skipped} already done, {len(failed)} failed; backend {args.backend}")
    if done:
        c = np.array(counts)
        print(
            f"cells per field: mean {c.mean():.1f}, min {c.min()}, max {c.max()}; "
            f"{np.mean(seconds):.2f} s per field (segmentation only)"
        )
    for image_id, reason in failed:
        print(f"FAILED {image_id}: {reason}", file=sys.stderr)
    print(f"outputs in {os.fspath(out)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
