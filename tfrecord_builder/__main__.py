"""Command line of the TFRecord builder: ``python -m tfrecord_builder [build] ...`` and ``... verify OUT``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from hpa_tf.cli import quiet_tensorflow

BUILD_EXAMPLE = """\
example:
  python -m tfrecord_builder --data-dir data/train --labels data/train.csv --out records \\
      --crop-size 512 --segmenter builtin --workers 4 --folds 5
  python -m tfrecord_builder --data-dir data/train --labels data/train.csv --out fields \
      --kind field --size 512 --workers 4 --folds 5
  python -m tfrecord_builder verify records
  python -m tfrecord_builder --runner beam --data-dir gs://B/train --labels train.csv --out gs://B/records \
      --beam-options "--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp \
      --setup_file=./setup.py"

A killed run resumes when started again with the same arguments; an output made with other
content-defining arguments is refused. OUT may be a local folder or a gs:// path; with --runner beam, so may --data-dir and --masks-dir.
"""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The build command's parser (``prog``: the name its usage shows)."""
    from hpa_tf.crops import CropSpec

    crop = CropSpec()  # the defaults
    p = argparse.ArgumentParser(
        prog=prog or "python -m tfrecord_builder",
        description="Segment fields of view, crop every cell and write TFRecord shards by fold "
        "(subcommands: build (default), verify OUT).",
        epilog=BUILD_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data-dir", required=True, help="folder of {ID}_{red,green,blue,yellow}.png|jpg|tif (e.g. train/)")
    p.add_argument("--labels", required=True, help="train.csv with columns ID,Label")
    p.add_argument("--out", required=True, help="output folder (local or gs://)")
    p.add_argument("--kind", default=crop.kind, choices=["cell", "field"],
                   help="records: 'cell' = one crop per segmented cell, 'field' = each whole field resized to "
                   f"--size x --size with its image labels, no segmentation (default {crop.kind})")
    p.add_argument("--crop-size", "--size", dest="crop_size", type=int, default=crop.size,
                   help=f"crop side (cells) or field side (fields) in pixels (default {crop.size})")
    p.add_argument("--margin", type=float, default=crop.margin,
                   help=f"crop margin: fraction of the cell box's longer side added on each side (default {crop.margin})")
    p.add_argument("--segmenter", default="builtin", choices=["builtin", "hpacellseg"],
                   help="segmentation backend (default builtin; ignored with --masks-dir)")
    p.add_argument("--nuclei-model", help="hpacellseg nuclei model file")
    p.add_argument("--cell-model", help="hpacellseg cell model file")
    p.add_argument("--device", default="auto",
                   help="hpacellseg device: auto (the GPU when PyTorch sees one, else the CPU), cpu, cuda or cuda:N "
                   "(default auto)")
    p.add_argument("--masks-dir", help="reuse saved masks {ID}_cells.png (uint16 label images) instead of segmenting")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes (default 1; use the number of cores; with --runner beam and no "
                   "--beam-options: the DirectRunner's workers)")
    p.add_argument("--runner", default="local", choices=["local", "beam"],
                   help="local: this machine's process pool; beam: an Apache Beam pipeline (pip install .[beam]) "
                   "that builds the same shard set (default local)")
    p.add_argument("--beam-options", action="append", default=[], metavar="'OPTIONS'",
                   help="Beam pipeline options in one quoted string, e.g. '--runner=DataflowRunner --project=P "
                   "--region=R --temp_location=gs://B/tmp --setup_file=./setup.py' (default: the local "
                   "DirectRunner); may be repeated")
    p.add_argument("--shard-mb", type=float, default=150.0, help="target shard size in MB (default 150)")
    p.add_argument("--images-per-shard", type=int, help="images per shard (overrides --shard-mb's estimate)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    p.add_argument("--mask-neighbors", action="store_true", default=crop.mask_neighbors,
                   help="zero other cells' pixels in each crop")
    p.add_argument("--encoding", default="png", choices=["png", "jpeg"], help="crop encoding (default png, lossless)")
    p.add_argument("--png-compression", type=int, default=1, help="PNG zlib level 0-9 (default 1)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--limit", type=int, help="build only the first N images by sorted ID (folds still use all)")
    p.add_argument("--min-cell-area", type=int, default=0, help="drop cells smaller than this many pixels (default 0)")
    p.add_argument("--source", default="train",
                   help="source name stored in the records of fields whose label-file row has no Source value "
                   "(default train; the downloader's train.csv says hpa-public per row)")
    p.add_argument("--cell-labels", help="CSV ID,CellId,Label giving each cell its own labels instead of its field's "
                   "(e.g. synthetic train_truth.csv or pseudo-labels); needs --masks-dir")
    p.add_argument("--max-shards", type=int, help="stop after building this many shards (resume later)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


def verify_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The verify command's parser (``prog``: the name its usage shows)."""
    p = argparse.ArgumentParser(
        prog=prog or "python -m tfrecord_builder verify",
        description="Read every shard of a built output and check it against manifest.csv (record counts, "
        "the count in each shard's name, record order) and decode a sample of crops. Exits 1 on any mismatch.",
    )
    p.add_argument("out", help="output folder of a build (local or gs://)")
    p.add_argument("--sample", type=int, default=2, help="records decoded per shard (default 2)")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


def _logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")


def _join_beam_options(argv: Sequence[str]) -> list[str]:
    """``--beam-options VALUE`` → ``--beam-options=VALUE``: the value starts with ``--`` (and may
    hold ``--runner=…``, which is also this command's flag), so argparse would not take it as a value."""
    out, args = [], list(argv)
    i = 0
    while i < len(args):
        if args[i] == "--beam-options" and i + 1 < len(args):
            out.append(f"--beam-options={args[i + 1]}")
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out


def build_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    quiet_tensorflow()
    parser = build_parser(prog)
    a = parser.parse_args(_join_beam_options(list(sys.argv[1:] if argv is None else argv)))
    name = parser.prog
    _logging(a.quiet)
    if not a.masks_dir and a.kind == "cell":
        from hpa_tf.segmentation import preload

        preload(a.segmenter)  # hpacellseg: PyTorch's stack must be imported before TensorFlow
    from hpa_tf.crops import CropSpec, CropSpecError
    from hpa_tf.fileutil import describe_write_error
    from hpa_tf.io import CsvFormatError
    from hpa_tf.labels import LabelError
    from tfrecord_builder import BuildError, BuildOptions, build

    seg_options = {}
    if a.segmenter == "hpacellseg":  # the builtin backend takes none of these
        seg_options = {k: v for k, v in (("nuclei_model", a.nuclei_model), ("cell_model", a.cell_model),
                                         ("device", a.device)) if v is not None}
    try:
        crop = CropSpec(kind=a.kind, size=a.crop_size, margin=a.margin, mask_neighbors=a.mask_neighbors)
        options = BuildOptions(
            data_dir=a.data_dir, labels=a.labels, out=a.out, crop=crop, segmenter=a.segmenter,
            segmenter_options=seg_options, masks_dir=a.masks_dir, workers=a.workers, shard_mb=a.shard_mb,
            images_per_shard=a.images_per_shard, folds=a.folds, seed=a.seed, encoding=a.encoding,
            png_compression=a.png_compression, jpeg_quality=a.jpeg_quality, limit=a.limit,
            min_cell_area=a.min_cell_area, source=a.source, runner=a.runner, beam_options=tuple(a.beam_options),
            cell_labels=a.cell_labels,
        )
        result = build(options, progress=not a.no_progress, max_shards=a.max_shards)
    except (BuildError, LabelError, CsvFormatError, CropSpecError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a full disk, no permission: one line, not a traceback
        line = describe_write_error(e, a.out)
        if line is None:
            raise
        print(f"{name}: error: {line}", file=sys.stderr)
        return 2
    print(result.line())
    if result.complete and result.cells == 0:
        print(f"{name}: error: nothing could be built; see {a.out}/skipped.csv", file=sys.stderr)
        return 1
    return 0


def verify_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    quiet_tensorflow()
    a = verify_parser(prog).parse_args(argv)
    _logging(a.quiet)
    from tfrecord_builder.verify import NotAShardSetError, verify

    try:
        report = verify(a.out, sample=a.sample)
    except NotAShardSetError as e:
        print(f"{prog or 'python -m tfrecord_builder verify'}: error: {e}", file=sys.stderr)
        return 2
    for problem in report.problems:
        print(f"{'CORRUPT' if problem in report.corrupt else 'MISMATCH'}: {problem}", file=sys.stderr)
    state = "OK" if report.ok else f"FAILED ({len(report.problems)} problem(s))"
    print(f"{state}: {report.shards} shards, {report.records} records, {report.manifest_rows} manifest rows, "
          f"{report.decoded} crops decoded")
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "verify":
        return verify_main(argv[1:], prog=f"{prog} verify" if prog else None)
    if argv and argv[0] == "build":
        argv = argv[1:]
    return build_main(argv, prog)


if __name__ == "__main__":
    raise SystemExit(main())
