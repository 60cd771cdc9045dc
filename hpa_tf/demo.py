"""``python -m hpa_tf demo --out runs/demo [--quick]``: the whole system on synthetic data.

Stages, each shown with its progress and each resumable (a rerun keeps what is finished):

1. write a synthetic HPA-like dataset (``hpa_tf.synthetic``) with cell-level truth; the test split
   holds truth of every class (``covering_labels``);
2. build TFRecord shards (``tfrecord_builder``): cell crops of the segmented training fields, and
   whole fields for the image-level model;
3. train the cell model and the field model (``hpa_tf.train``), and, unless ``--quick``, the
   supervised reference: the same cell model and budget trained on the true cells with their
   cell-level truth (``train_truth.csv``) instead of their field's labels;
4. segment the validation fold and the test split once; predict the validation fold with both
   models and pick the fusion (rule and weights) with the best mAP there, never on the test split;
   predict the test split with it, writing ``submission.csv`` and every cell's component scores
   (``hpa_tf.predict``);
5. score each component (cell model, field model's image probability, CAM, fusion, supervised
   reference) with the competition's metric beside the random and ceiling baselines of the same
   cells and the skill between them (``hpa_tf.metric.evaluate_rescorings``);
6. write ``report.md`` with training curves, the skill table, per-class AP, a segmentation overlay
   and a montage of cell crops with the target cell outlined.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of a demo run (see ``PRESETS``; the figures of each are in the README)."""

    train_fields: int = 120
    test_fields: int = 48
    size: int = 768
    crop_size: int = 64
    image_size: int = 48
    mask_neighbors: bool = True
    backbone: str = "tiny_cnn"
    epochs: int = 16
    batch_size: int = 64
    lr: float = 3e-3
    field_size: int = 128
    field_epochs: int = 15
    field_batch_size: int = 16
    field_lr: float = 3e-3
    supervised: bool = True
    folds: int = 5
    cell_dropout: float = 0.2
    seed: int = 0
    workers: int = 2


PRESETS: dict[str, DemoSettings] = {
    # measured (README, wall clock on 2 cores): default 3 min 17 s, fusion skill 0.48 (160 fields and
    # 20 epochs: 4 min 52 s, 0.45); --quick 72 s, skill 0.64 (80 fields: 90 s, 0.67). The time bars
    # (≤ 4 min, ≤ 90 s) set the fields, epochs and the field model's size; the field model adds
    # little at any size tried
    "default": DemoSettings(),
    "quick": DemoSettings(train_fields=64, test_fields=16, size=512, epochs=10, batch_size=32, field_size=128,
                          field_epochs=10, field_batch_size=8, supervised=False, folds=4),
}

#: Fusion candidates tried on the validation fold: (rule, (a, b, c)) with a, b, c the weights of the
#: cell model, the field image probability and the CAM score (``hpa_tf.predict.fuse_components``).
FUSION_CANDIDATES: tuple[tuple[str, tuple[float, float, float]], ...] = tuple(
    [("mean", (a, b, c)) for a, b, c in itertools.product((0.0, 1.0, 2.0, 4.0), (0.0, 0.5, 1.0), (0.0, 0.5, 1.0, 2.0))
     if a + b + c > 0 and (a + c) > 0]
    + [("product", (a, b, c)) for a, b, c in itertools.product((0.0, 1.0, 2.0), (0.5, 1.0), (0.0, 1.0, 2.0))
       if a + c > 0]
)
#: The components scored on the test split, in the report's order.
COMPONENT_NAMES: dict[str, str] = {
    "cell": "cell model",
    "image": "field model: image probability (same for every cell of a field)",
    "cam": "field model: CAM score of the cell",
    "fusion": "fusion (chosen on the validation fold)",
    "supervised": "supervised reference: the cell model trained on cell-level truth",
}
STAGES = 6


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its finished children (the builder's pool)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _stage(n: int, title: str) -> tuple[float, float]:
    print(f"\n[{n}/{STAGES}] {title}", flush=True)
    return time.perf_counter(), _cpu_seconds()


def _segment(data_dir: Path, ids: Sequence[str], masks: Path, workers: int) -> None:
    """Segment fields with the built-in segmenter once, saving ``{ID}_cells.png`` and ``{ID}_nuclei.png``
    in ``masks`` (kept when there): every later prediction reuses them (``masks_dir``)."""
    from tqdm import tqdm

    from hpa_tf.io import read_rgby, write_label_image
    from hpa_tf.segmentation import get_segmenter

    masks.mkdir(parents=True, exist_ok=True)
    todo = [i for i in ids if not (masks / f"{i}_cells.png").exists()]
    if not todo:
        return
    seg = get_segmenter("builtin")
    for image_id in tqdm(todo, desc="segment", unit="field"):
        cells, nuclei = seg.segment(read_rgby(data_dir, image_id))
        write_label_image(masks / f"{image_id}_nuclei.png", nuclei)
        write_label_image(masks / f"{image_id}_cells.png", cells)  # last: its presence means done


def _train(settings: DemoSettings, shards: Path, out: Path, *, image_size: int, epochs: int, batch_size: int,
           lr: float):
    from hpa_tf.train import TrainConfig, train

    return train(TrainConfig(data=str(shards), out=str(out), val_fold=0, backbone=settings.backbone,
                             image_size=image_size, batch_size=batch_size, epochs=epochs, lr=lr, seed=settings.seed,
                             resume=(out / "state.json").exists(), tensorboard=False, verbose=2))


def _predict(data_dir: Path, ids: Sequence[str], masks: Path, out: Path, models: Sequence[str],
             field_models: Sequence[str], fusion: str | None = None,
             weights: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> dict:
    from hpa_tf.predict import PredictConfig, run

    return run(PredictConfig(test_dir=str(data_dir), ids=list(ids), models=list(models) or None,
                             field_models=list(field_models) or None, out=str(out), masks_dir=str(masks),
                             fusion=fusion, fusion_weights=weights, component_scores=True, image_weight=0.0,
                             batch_size=64))


def choose_fusion(rows, components, truth, image_ids) -> tuple[str, tuple[float, float, float], list[dict]]:
    """The fusion candidate (``FUSION_CANDIDATES``) with the best mAP on the given (validation) fields;
    ties go to the first. Returns ``(rule, weights, table)`` with every candidate's mAP."""
    from hpa_tf.metric import evaluate_rescorings
    from hpa_tf.predict import component_rows, fuse_components

    def fused(rule, weights):
        return lambda entry: fuse_components({k: v for k, v in entry.items() if k != "cell_ids"}, rule, weights)

    subs = {f"{rule} {w}": component_rows(rows, components, fused(rule, w)) for rule, w in FUSION_CANDIDATES}
    scored = evaluate_rescorings(subs, truth, image_ids=image_ids, n_seeds=1)
    table = [{"rule": rule, "weights": list(w), "mAP": scored[f"{rule} {w}"].mean_ap,
              "skill": scored[f"{rule} {w}"].skill} for rule, w in FUSION_CANDIDATES]
    best = max(range(len(table)), key=lambda i: (table[i]["mAP"], -i))
    return FUSION_CANDIDATES[best][0], FUSION_CANDIDATES[best][1], table


def run_demo(out: str | os.PathLike, settings: DemoSettings) -> dict:
    """Run every stage into ``out``; returns the figures that ``report.md`` shows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings_path = out / "demo_settings.json"
    if settings_path.exists() and json.loads(settings_path.read_text()) != asdict(settings):
        raise SystemExit(f"{out} holds a demo run with other settings ({settings_path}); use another --out")
    settings_path.write_text(json.dumps(asdict(settings), indent=2))
    data = out / "data"
    # seconds per stage; a resumed run keeps the figures of the run that did the work
    timings_path = out / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    t_all = time.perf_counter()

    cpu_path = out / "cpu_seconds.json"
    cpu: dict[str, float] = json.loads(cpu_path.read_text()) if cpu_path.exists() else {}

    def done(stage: str, start: tuple[float, float], did_work: bool = True) -> None:
        if did_work or stage not in timings:
            timings[stage] = round(time.perf_counter() - start[0], 1)
            cpu[stage] = round(_cpu_seconds() - start[1], 1)
            timings_path.write_text(json.dumps(timings, indent=2))
            cpu_path.write_text(json.dumps(cpu, indent=2))

    # 1. data --------------------------------------------------------------------------------
    t0 = _stage(1, f"synthetic dataset: {settings.train_fields} train + {settings.test_fields} test fields "
                   f"of {settings.size} px")
    from hpa_tf.synthetic import covering_labels, write_dataset

    fresh = not (data / "truth.csv").exists()
    if fresh:
        write_dataset(data, settings.train_fields, settings.test_fields, settings.size, settings.seed,
                      cell_dropout=settings.cell_dropout, workers=settings.workers, progress=True,
                      test_labels=covering_labels(settings.test_fields))
    else:
        print("  already there, kept")
    done("data", t0, fresh)

    # 2. shards ----------------------------------------------------------------------------------
    t0 = _stage(2, "build TFRecord shards: cell crops of the segmented training fields, and whole fields")
    from hpa_tf.crops import CropSpec
    from tfrecord_builder import BuildOptions, build

    common = dict(data_dir=str(data / "train"), labels=str(data / "train.csv"), workers=settings.workers,
                  folds=settings.folds, seed=settings.seed, images_per_shard=8)
    cell_spec = CropSpec(size=settings.crop_size, mask_neighbors=settings.mask_neighbors)
    built = build(BuildOptions(out=str(out / "shards"), crop=cell_spec, segmenter="builtin", **common), progress=True)
    print("  cells:  " + built.line())
    # whole fields: reading and resizing only, cheaper in this process than in a pool
    built_fields = build(BuildOptions(out=str(out / "field_shards"), crop=CropSpec(kind="field", size=settings.field_size),
                                      **{**common, "workers": 1}), progress=True)
    print("  fields: " + built_fields.line())
    built_sup = None
    if settings.supervised:
        built_sup = build(BuildOptions(out=str(out / "supervised_shards"), crop=cell_spec,
                                       masks_dir=str(data / "masks"), cell_labels=str(data / "train_truth.csv"),
                                       **common), progress=True)
        print("  supervised reference (true cells, cell-level truth): " + built_sup.line())
    done("build", t0, built.shards_built + built_fields.shards_built + (built_sup.shards_built if built_sup else 0) > 0)

    # 3. training --------------------------------------------------------------------------------
    t0 = _stage(3, f"train the cell model ({settings.backbone} at {settings.image_size} px, {settings.epochs} epochs) "
                   f"and the field model ({settings.field_size} px, {settings.field_epochs} epochs); validation: fold 0")
    trained = _train(settings, out / "shards", out / "train", image_size=settings.image_size, epochs=settings.epochs,
                     batch_size=settings.batch_size, lr=settings.lr)
    trained_field = _train(settings, out / "field_shards", out / "train_field", image_size=settings.field_size,
                           epochs=settings.field_epochs, batch_size=settings.field_batch_size, lr=settings.field_lr)
    model_path = trained.best_path or trained.last_path
    field_path = trained_field.best_path or trained_field.last_path
    for name, t, path in (("cell model", trained, model_path), ("field model", trained_field, field_path)):
        if t.epochs_completed > t.initial_epoch:
            best = f", best {t.monitor} {t.best_value:.3f}" if t.best_value is not None else ""
            print(f"  {name}: {t.epochs_completed} epoch(s){best} -> {path}")
        else:
            print(f"  {name}: already trained ({t.epochs_completed} epochs), kept")
    did = trained.epochs_completed > trained.initial_epoch or trained_field.epochs_completed > trained_field.initial_epoch
    sup_path = None
    if settings.supervised:
        print("  supervised reference: the same cell model and budget on cell-level truth")
        trained_sup = _train(settings, out / "supervised_shards", out / "train_supervised",
                             image_size=settings.image_size, epochs=settings.epochs, batch_size=settings.batch_size,
                             lr=settings.lr)
        sup_path = trained_sup.best_path or trained_sup.last_path
        did = did or trained_sup.epochs_completed > trained_sup.initial_epoch
    done("train", t0, did)

    # 4. prediction --------------------------------------------------------------------------------
    t0 = _stage(4, "segment the validation fold and the test split; choose the fusion on the validation fold; "
                   "predict the test split")
    from hpa_tf.folds import read_folds_csv
    from hpa_tf.io import read_sample_submission
    from hpa_tf.metric import load_truth
    from hpa_tf.predict import components_file, read_components
    from hpa_tf.submission import read_submission

    folds = read_folds_csv(out / "shards" / "folds.csv")
    val_ids = sorted(i for i, f in folds.items() if f == 0)
    test_ids = [r.image_id for r in read_sample_submission(data / "sample_submission.csv")]
    masks = out / "predicted_masks"
    _segment(data / "train", val_ids, masks, settings.workers)
    _segment(data / "test", test_ids, masks, settings.workers)
    val_sub = out / "validation" / "submission.csv"
    (out / "validation").mkdir(exist_ok=True)
    _predict(data / "train", val_ids, masks, val_sub, [model_path], [field_path])
    val_truth = load_truth(data / "train_truth.csv", masks_dir=data / "masks", image_ids=val_ids)
    fusion, weights, fusion_table = choose_fusion(read_submission(val_sub),
                                                  read_components(components_file(val_sub)),
                                                  val_truth, val_ids)
    print(f"  fusion chosen on the validation fold ({len(val_ids)} fields): {fusion} with weights "
          f"cell {weights[0]:g}, image {weights[1]:g}, CAM {weights[2]:g}")
    submission = out / "submission.csv"
    predicted = _predict(data / "test", test_ids, masks, submission, [model_path], [field_path], fusion, weights)
    kept = ", all from the cache, kept" if predicted["cached"] == predicted["fields"] else ""
    print(f"  {predicted['fields']} fields, {predicted['cells']} cells -> {submission}{kept}")
    sup_sub = None
    if sup_path:
        sup_sub = out / "supervised" / "submission.csv"
        (out / "supervised").mkdir(exist_ok=True)
        _predict(data / "test", test_ids, masks, sup_sub, [sup_path], [])
    done("predict", t0, predicted["cached"] < predicted["fields"])

    # 5. metric --------------------------------------------------------------------------------
    t0 = _stage(5, "score each component with the competition's metric (mAP, IoU >= 0.6) beside random and "
                   "ceiling baselines")
    from hpa_tf.metric import evaluate_rescorings
    from hpa_tf.predict import component_rows

    rows = read_submission(submission)
    comps = read_components(components_file(submission))
    subs = {name: component_rows(rows, comps, lambda e, n=name: e[n]) for name in ("cell", "image", "cam")}
    subs["fusion"] = rows
    if sup_sub is not None:
        sup_comps = read_components(components_file(sup_sub))
        subs["supervised"] = component_rows(rows, sup_comps, lambda e: e["cell"])
    truth = load_truth(str(data / "truth.csv"), masks_dir=str(data / "masks"))
    scored = evaluate_rescorings(subs, truth)
    result = scored["fusion"]
    print(result.format_table())
    for name, r in scored.items():
        print(f"  {COMPONENT_NAMES[name]}: mAP {r.mean_ap:.3f}, skill {r.skill:.3f}")
    (out / "metric.json").write_text(json.dumps(
        {"components": {name: r.to_dict() for name, r in scored.items()},
         "fusion": {"rule": fusion, "weights": list(weights), "validation": fusion_table}}, indent=2, default=float))
    done("metric", t0)

    # 6. report --------------------------------------------------------------------------------
    t0 = _stage(6, "write report.md")
    figures = _write_report(out, settings, data, out / "train", out / "train_field", model_path, built, trained,
                            trained_field, predicted, scored, (fusion, weights, fusion_table), masks, timings, cpu)
    done("report", t0)
    print(f"\nfusion: mAP {result.mean_ap:.3f}, skill {result.skill:.3f} (random {result.random_map:.3f}, ceiling "
          f"{result.ceiling_map:.3f}) on the synthetic test split; {time.perf_counter() - t_all:.0f} s; "
          f"report: {out / 'report.md'}")
    return figures


def _segmentation_figures(data: Path, ids: Sequence[str], masks: Path):
    """Score the saved segmentation of the test fields (``_segment``) against the truth."""
    from hpa_tf.io import read_label_image, read_rgby
    from hpa_tf.segmentation.evaluate import score_segmentation

    tc, tn, pc, pn, images = [], [], [], [], []
    for image_id in ids:
        images.append(read_rgby(data / "test", image_id))
        pc.append(read_label_image(masks / f"{image_id}_cells.png"))
        pn.append(read_label_image(masks / f"{image_id}_nuclei.png"))
        tc.append(read_label_image(data / "masks" / f"{image_id}_cells.png"))
        tn.append(read_label_image(data / "masks" / f"{image_id}_nuclei.png"))
    return score_segmentation(tc, tn, pc, pn), images, pc, pn, tc


def _fmt(x: float) -> str:
    return "–" if x != x else f"{x:.3f}"


def _write_report(out, settings, data, train_dir, field_dir, model_path, built, trained, trained_field, predicted,
                  scored, fusion_choice, masks, timings, cpu) -> dict:
    from hpa_tf import report
    from hpa_tf.io import read_sample_submission
    from hpa_tf.labels import CLASS_NAMES, SHORT_NAMES
    from hpa_tf.model import ModelSpec, load_model
    from hpa_tf.predict import components_file, fuse_components, read_components
    from hpa_tf.segmentation import draw_overlay
    from hpa_tf.segmentation.evaluate import contingency

    fusion, weights, fusion_table = fusion_choice
    result = scored["fusion"]
    pics = out / "pictures"
    pics.mkdir(exist_ok=True)
    ids = [r.image_id for r in read_sample_submission(data / "sample_submission.csv")]
    seg_score, images, pred_cells, pred_nuclei, true_cells = _segmentation_figures(data, ids, masks)
    report.save_rgb(draw_overlay(images[0], pred_cells[0], pred_nuclei[0], max_size=1024), pics / "segmentation.png")
    for folder, name in ((train_dir, "training"), (field_dir, "training_field")):
        if (folder / "log.csv").exists():
            report.plot_training_curves(report.read_log(folder / "log.csv"), pics / f"{name}.png")
    report.plot_per_class_ap(result.per_class_ap, result.n_truth, pics / "per_class_ap.png",
                             title=f"fusion on the synthetic test split: mAP {result.mean_ap:.3f}")

    # montage: cells of the test fields cropped as the cell model's model.json says, the target cell
    # outlined, titled with the fused scores the submission holds
    truth: dict[tuple[str, int], list[int]] = {}
    from hpa_tf.fileutil import raise_csv_field_size_limit

    raise_csv_field_size_limit()
    with open(data / "truth.csv", newline="") as f:
        for row in csv.DictReader(f):
            truth[(row["ID"], int(row["CellId"]))] = [int(c) for c in row["Label"].split("|")]
    spec = ModelSpec.from_config(load_model(model_path).config, where=str(model_path))
    comps = read_components(components_file(out / "submission.csv"))
    crops_all, masks_all, scores_all, truth_all = [], [], [], []
    per_field = max(1, -(-24 // max(1, len(ids))))  # spread the montage over the fields
    for image, cells, tcells, image_id in zip(images, pred_cells, true_cells, ids):
        if image_id not in comps:
            continue
        cc = spec.crop.crop(image, cells)
        entry = comps[image_id]
        fused = fuse_components({k: v for k, v in entry.items() if k != "cell_ids"}, fusion, weights)
        row_of = {int(c): k for k, c in enumerate(entry["cell_ids"])}
        best_true = contingency(tcells, cells)[1:, :].argmax(axis=0) + 1  # the true cell each overlaps most
        for j in np.argsort(-cc.areas)[:per_field]:  # the field's largest (most visible) cells
            cid = int(cc.cell_ids[j])
            t = int(best_true[cid]) if cid < len(best_true) else 0
            crops_all.append(cc.crops[j])
            masks_all.append(cc.masks[j])
            scores_all.append(fused[row_of[cid]])
            truth_all.append(truth.get((image_id, t), []) if t else [])
    n = min(24, len(crops_all))
    if n:
        report.plot_crop_montage(np.stack(crops_all[:n]), np.stack(scores_all[:n]), truth_all[:n],
                                 pics / "cells.png", masks=np.stack(masks_all[:n]))

    # report.md --------------------------------------------------------------------------------
    crop_text = (f"{settings.crop_size} px crops{' with neighbours masked' if settings.mask_neighbors else ''} "
                 f"at {settings.image_size} px")
    lines = [
        "# hpa-tf demo report",
        "",
        f"Synthetic data: {settings.train_fields} training and {settings.test_fields} test fields of "
        f"{settings.size} px (seed {settings.seed}; the test split holds truth of every class). Cell model "
        f"`{settings.backbone}` on {crop_text}, {settings.epochs} epochs; field model `{settings.backbone}` on "
        f"whole fields at {settings.field_size} px, {settings.field_epochs} epochs; {trained.replicas} replica(s). "
        "Both learn from image-level labels only (every cell of a field carries the field's labels).",
        "",
        "## Result",
        "",
        "Each component scores the same predicted cells of the test split (competition metric, IoU ≥ 0.6). "
        "**random**: the same cells with random confidences (the metric ignores classes absent from an image's "
        "truth, so a score-blind ranking already earns the share of positive cells); **ceiling**: each predicted "
        "cell given its true classes (what the segmentation allows); **skill** = (mAP − random) / "
        "(ceiling − random): 0 = chance, 1 = perfect.",
        "",
        "| component | mAP | random | ceiling | skill |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in scored.items():
        label = COMPONENT_NAMES[name]
        if name == "fusion":
            label = f"**{label}: {fusion}, weights cell {weights[0]:g} / image {weights[1]:g} / CAM {weights[2]:g}**"
        lines.append(f"| {label} | {_fmt(r.mean_ap)} | {_fmt(r.random_map)} | {_fmt(r.ceiling_map)} | "
                     f"**{_fmt(r.skill)}** |")
    best_val = max(fusion_table, key=lambda t: t["mAP"])
    lines += [
        "",
        f"- Fusion: {len(fusion_table)} candidates (weighted mean and image × cell/CAM product, "
        "`hpa_tf.predict.fuse_components`) scored on the validation fold (fold 0 of the training fields, "
        f"with their cell-level truth); the best, mAP {best_val['mAP']:.3f} there, is used on the test split.",
        "- The supervised reference (default run only) shows what the weak labels cost: the same cell model and "
        "budget trained on the true cells with their own labels." if "supervised" in scored else
        "- No supervised reference in this run (`--quick`); the default run trains one.",
        f"- Segmentation of the test fields (built-in backend): {seg_score.cell_recall:.1%} of true cells "
        f"matched at IoU ≥ 0.6 (median IoU {seg_score.cell_median_iou:.3f}); {result.n_matched_cells} of "
        f"{result.n_predicted_cells} predicted cells match a true cell. A missed cell cannot be scored: this is "
        "the ceiling.",
        f"- Shards: {built.fields} training fields, {built.cells} cell crops in {built.shards} shards "
        f"({built.bytes / 1e6:.0f} MB); {built.fields_skipped} field(s) skipped.",
        f"- Prediction: {predicted['cells']} cells in {predicted['fields']} fields; seconds per field: "
        + ", ".join(f"{k} {v:.2f}" for k, v in predicted["seconds_per_field"].items()),
        "- Time per stage (s, wall clock): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
        + f"; total {sum(timings.values()):.0f}. CPU seconds (all processes): "
        + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()) + f"; total {sum(cpu.values()):.0f}.",
        "",
        "## Training",
        "",
        "Cell model:",
        "",
        "![training curves](pictures/training.png)",
        "",
        "Field model:",
        "",
        "![field model training curves](pictures/training_field.png)",
        "",
        "## Per-class AP and skill",
        "",
        "![per-class AP](pictures/per_class_ap.png)",
        "",
        "| class | truth cells | " + " | ".join(f"{n} AP" for n in scored) + " | random | ceiling | fusion skill |",
        "|---|---:|" + "---:|" * (len(scored) + 3),
    ]
    skill = result.per_class_skill
    for c in range(len(CLASS_NAMES)):
        lines.append(f"| {c} {CLASS_NAMES[c]} | {result.n_truth[c]} | "
                     + " | ".join(_fmt(r.per_class_ap[c]) for r in scored.values())
                     + f" | {_fmt(result.per_class_random[c])} | {_fmt(result.per_class_ceiling[c])} | {_fmt(skill[c])} |")
    lines += [
        "",
        "## Segmentation",
        "",
        "Cell outlines (white) and nuclei (cyan) found by the built-in segmenter on the first test field:",
        "",
        "![segmentation overlay](pictures/segmentation.png)",
        "",
        "## Cells and their predicted labels",
        "",
        "Each crop is what the cell model sees (its crop spec), **contrast-stretched for display** (each channel "
        "scaled to its 99.5th percentile); the target cell is outlined in white. Top-2 fused scores above each crop; "
        "the true classes of the cell below (green when the top prediction is one of them).",
        "",
        "![cell montage](pictures/cells.png)",
        "",
        f"Short names: {', '.join(f'{i} {s}' for i, s in enumerate(SHORT_NAMES))}.",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    figures = {"mAP": result.mean_ap, "random_mAP": result.random_map, "ceiling_mAP": result.ceiling_map,
               "skill": result.skill, "macro_f1": result.metric.macro_f1,
               "components": {name: {"mAP": r.mean_ap, "skill": r.skill} for name, r in scored.items()},
               "fusion": {"rule": fusion, "weights": list(weights)},
               "segmentation": seg_score.as_dict(), "timings": timings, "cpu_seconds": cpu}
    (out / "figures.json").write_text(json.dumps(figures, indent=2, default=float))
    return figures


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The demo's command line (``prog``: the name its usage shows)."""
    from hpa_tf.cli import plain

    d, q = PRESETS["default"], PRESETS["quick"]

    def preset(key: str) -> str:
        return f"(default: {getattr(d, key)}; with --quick: {getattr(q, key)})"

    p = argparse.ArgumentParser(prog=prog or "python -m hpa_tf demo", description=plain(__doc__),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--quick", action="store_true",
                   help=f"a small run: {q.train_fields} training and {q.test_fields} test fields of {q.size} px, "
                        f"{q.epochs} epochs (default: {d.train_fields} and {d.test_fields} fields of {d.size} px, "
                        f"{d.epochs} epochs)")
    p.add_argument("--epochs", type=int, help=f"number of epochs {preset('epochs')}")
    p.add_argument("--backbone", help=f"backbone, e.g. efficientnet_b0 or tiny_cnn {preset('backbone')}")
    p.add_argument("--train-fields", type=int, help=f"number of training fields {preset('train_fields')}")
    p.add_argument("--seed", type=int, help=f"seed of the data, folds and training {preset('seed')}")
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    from hpa_tf.cli import quiet_tensorflow

    quiet_tensorflow()  # CPU-only machines: hide CUDA-probe noise
    p = build_parser(prog)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = PRESETS["quick" if a.quick else "default"]
    overrides = {k: v for k, v in (("epochs", a.epochs), ("backbone", a.backbone), ("train_fields", a.train_fields),
                                   ("seed", a.seed)) if v is not None}
    settings = replace(settings, **overrides)
    run_demo(a.out, settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
