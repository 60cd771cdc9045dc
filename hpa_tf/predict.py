"""Offline prediction: segment every test field, classify every cell, write the submission.

For each field: read (8- or 16-bit), segment (or reuse saved masks), crop every cell with
``hpa_tf.crops.cell_crops`` using the crop settings each model was trained with (its
``model.json``), classify in batches, average models and test-time-augmentation views, fuse cell
and image-level scores, and emit all 19 classes for every cell (only the ranking of confidences
within a class matters to the metric, so emitting every class never hurts).

Components and fusion. Each cell gets up to three scores per class (``COMPONENTS``):

``cell``   the cell models' probability for its crop (``--model``; kind ``cell`` in model.json);
``image``  the field models' image-level probability for the whole field (``--field-model``; kind
           ``field``), the same for every cell of the field;
``cam``    the field models' class activation map averaged inside the cell (``hpa_tf.cam``).

``fuse_components`` combines them with the weights ``a, b, c`` (``--fusion-weights``):
``mean`` = ``(a·cell + b·image + c·cam) / (a + b + c)`` over the components present;
``product`` = ``image^b · (a·cell + c·cam) / (a + c)`` (the image probability gates the cell's
own evidence, as 8th place did with image labels × CAM). Without a field model the cell score is
fused with the field's highest cell score instead, ``(1 - w) · cell + w · max`` with
``w = image_weight`` (0 turns it off): a field's image score ranks its cells against other
fields' cells, which the per-cell score alone cannot do. With ``component_scores`` every cell's
component scores are written beside the submission (``OUT's stem.components.json``), so that
each component can be scored on its own and fusion weights chosen on held-out fields
(``component_rows``).

Nothing here reaches the network. Finished fields are cached (one small JSON per field, written
atomically) so a killed run restarted with the same arguments only does the rest; the CSV is
written under a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hpa_tf.config import PredictConfig
from hpa_tf.crops import CellCrops, CropSpec
from hpa_tf.fileutil import atomic_open
from hpa_tf.io import (
    ImageReadError,
    channel_indices,
    list_image_ids,
    read_label_image,
    read_rgby,
    read_sample_submission,
)
from hpa_tf.labels import NUM_CLASSES
from hpa_tf.submission import (
    Prediction,
    SubmissionRow,
    encode_cells,
    format_prediction_string,
    parse_prediction_string,
    write_submission,
)

if TYPE_CHECKING:
    from hpa_tf.model import ModelSpec

log = logging.getLogger(__name__)

STAGES = ("read", "segment", "crop", "model", "field_model", "encode")
#: Per-cell score components (module docstring), in the order of ``--fusion-weights``.
COMPONENTS: tuple[str, ...] = ("cell", "image", "cam")
FUSIONS: tuple[str, ...] = ("mean", "product")


@dataclass
class ClassifierSpec:
    """A loaded classifier and what its ``model.json`` says (``hpa_tf.model.ModelSpec``: input size,
    channels and the crop spec it was trained on)."""

    path: str
    model: object
    spec: ModelSpec  # hpa_tf.model.ModelSpec (imported when models are loaded: keeps this module light)


#: ``on_crops(image_id, crop_spec, batch)``: called with every batch of crops the models are given.
CropsHook = Callable[[str, CropSpec, CellCrops], None]


@dataclass
class FieldResult:
    image_id: str
    width: int
    height: int
    prediction_string: str = ""
    n_cells: int = 0
    status: str = "ok"  # ok | no_cells | error
    error: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    cell_ids: list[int] = field(default_factory=list)
    components: dict[str, list[list[float]]] = field(default_factory=dict)  # name -> (N, 19) per cell_ids


class PredictError(RuntimeError):
    """A problem with the prediction run's inputs (models, IDs, folders)."""


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def check_model_files(paths: Sequence[str]) -> None:
    """PredictError unless every model path is a file (cheap: nothing is loaded)."""
    if not paths:
        raise PredictError("no model given: pass --model CELL.keras and/or --field-model FIELD.keras")
    for path in paths:
        if not Path(path).is_file():
            raise PredictError(f"model file not found: {path}")


def load_models(paths: Sequence[str], kind: str | None = None) -> list[ClassifierSpec]:
    """Load ``.keras`` classifiers and read the ``model.json`` beside each (required: it holds the crop
    spec, read with ``ModelSpec.from_config``; nothing is filled in by a default). ``kind``: the
    crop spec kind each must have (``cell`` for ``--model``, ``field`` for ``--field-model``)."""
    from hpa_tf.model import ModelConfigError, ModelSpec, load_model

    check_model_files(paths)
    loaded = []
    for path in paths:
        try:
            model, config = load_model(path)
        except ValueError as e:  # not a Keras model, or a model.json that disagrees with it
            raise PredictError(str(e)) from None
        if config is None:
            raise PredictError(f"{path}: no model.json beside it: its crop spec and channels are unknown")
        try:
            spec = ModelSpec.from_config(config, where=f"{path} config")
        except ModelConfigError as e:
            raise PredictError(str(e)) from None
        if tuple(model.input_shape[1:]) != (spec.image_size, spec.image_size, len(spec.channels)):
            raise PredictError(f"{path}: model takes {tuple(model.input_shape[1:])} but model.json says "
                               f"{spec.image_size} px, channels {spec.channels!r}")
        if kind is not None and spec.crop.kind != kind:
            flag = "--field-model" if spec.crop.kind == "field" else "--model"
            raise PredictError(f"{path}: a {spec.crop.kind} model (its model.json crop kind): pass it with {flag}")
        loaded.append(ClassifierSpec(path=str(path), model=model, spec=spec))
    return loaded


def _views(batch: np.ndarray, tta: bool) -> list[np.ndarray]:
    """The test-time views of a (N, S, S, C) batch: identity, and with ``tta`` three flips."""
    if not tta:
        return [batch]
    return [batch, batch[:, :, ::-1], batch[:, ::-1, :], batch[:, ::-1, ::-1]]


class Classifier:
    """Runs one model on uint8 crops with a fixed-size, traced call (no retracing per batch)."""

    def __init__(self, loaded: ClassifierSpec, batch_size: int):
        import tensorflow as tf

        from hpa_tf.data import resize

        self.loaded = loaded
        self.batch_size = batch_size
        self.index = channel_indices(loaded.spec.channels)
        size, crop = loaded.spec.image_size, loaded.spec.crop.size
        model = loaded.model

        # the training pipeline's own resize (hpa_tf.data.resize), on the whole batch
        @tf.function(input_signature=[tf.TensorSpec([None, crop, crop, len(self.index)], tf.uint8)])
        def run(x):
            return model(resize(x, size), training=False)

        self._run = run

    def __call__(self, crops: np.ndarray, tta: bool) -> np.ndarray:
        x = crops[..., self.index]
        out = np.zeros((len(x), NUM_CLASSES), np.float64)
        views = _views(x, tta)
        for view in views:
            for start in range(0, len(view), self.batch_size):
                chunk = np.ascontiguousarray(view[start : start + self.batch_size])
                out[start : start + len(chunk)] += self._run(chunk).numpy()
        return out / len(views)


class FieldModel:
    """Runs one image-level model on a whole field: image probabilities and class maps (``hpa_tf.cam``)
    with a traced call; the field is resized as the builder resized it (its crop spec's ``field``)."""

    def __init__(self, loaded: ClassifierSpec):
        import tensorflow as tf

        from hpa_tf.cam import cam_model
        from hpa_tf.data import resize

        self.loaded = loaded
        self.index = channel_indices(loaded.spec.channels)
        size, side = loaded.spec.image_size, loaded.spec.crop.size
        cam = cam_model(loaded.model)

        @tf.function(input_signature=[tf.TensorSpec([None, side, side, len(self.index)], tf.uint8)])
        def run(x):
            return cam(resize(x, size), training=False)

        self._run = run

    def __call__(self, image: np.ndarray, tta: bool) -> tuple[np.ndarray, np.ndarray]:
        """``(image probabilities (19,), class maps (h, w, 19) logits)`` of a full-resolution field,
        averaged over the flips with ``tta`` (each view's map flipped back)."""
        x = self.loaded.spec.crop.field(image)[..., self.index][None]
        views = _views(x, tta)
        probs, maps = self._run(np.ascontiguousarray(np.concatenate(views)))
        probs, maps = probs.numpy().astype(np.float64), maps.numpy().astype(np.float64)
        if tta:  # undo each view's flip on its map: identity, left-right, up-down, both
            maps = np.stack([maps[0], maps[1][:, ::-1], maps[2][::-1, :], maps[3][::-1, ::-1]])
        return probs.mean(axis=0), maps.mean(axis=0)


def fuse_components(components: dict[str, np.ndarray], fusion: str | None = None,
                    weights: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Combine per-cell component scores (``COMPONENTS``: each (N, 19) in [0, 1], absent ones left out)
    into one (N, 19) score: ``mean`` or ``product`` (module docstring) with weights ``a, b, c`` of
    cell, image and CAM. ``fusion`` None: ``mean`` when a cell score is present, else ``product``.

    Raises
    ------
    ValueError : an unknown rule or component, no component, weights that leave nothing, or
        ``product`` without the field model's image score.
    """
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown or not components:
        raise ValueError(f"components must be some of {COMPONENTS}, got {sorted(components)}")
    fusion = fusion or ("mean" if "cell" in components else "product")
    w = dict(zip(COMPONENTS, (float(v) for v in weights)))
    if len(w) != 3 or any(not v >= 0 for v in w.values()):
        raise ValueError(f"fusion weights must be three numbers >= 0, got {tuple(weights)}")

    def weighted_mean(names: Sequence[str]) -> np.ndarray:
        present = [n for n in names if n in components and w[n] > 0]
        if not present:
            raise ValueError(f"fusion weights {tuple(weights)} give no weight to any of {list(names)} "
                             f"(present: {sorted(components)})")
        total = sum(w[n] for n in present)
        return sum(w[n] * np.asarray(components[n], np.float64) for n in present) / total

    if fusion == "mean":
        return weighted_mean(COMPONENTS)
    if fusion == "product":
        if "image" not in components:
            raise ValueError("fusion 'product' needs a field model (the image probability)")
        return np.asarray(components["image"], np.float64) ** w["image"] * weighted_mean(("cell", "cam"))
    raise ValueError(f"unknown fusion {fusion!r}: expected one of {FUSIONS}")


def fuse_scores(cell_scores: np.ndarray, image_weight: float) -> np.ndarray:
    """``(1 - w) · cell + w · max over the field's cells``, per class; ``(N, 19)`` in [0, 1]."""
    if not 0.0 <= image_weight <= 1.0:
        raise ValueError(f"image_weight must be in [0, 1], got {image_weight}")
    if len(cell_scores) == 0 or image_weight == 0:
        return cell_scores
    image_scores = cell_scores.max(axis=0, keepdims=True)
    return (1.0 - image_weight) * cell_scores + image_weight * image_scores


# ----------------------------------------------------------------------------------------------
# One field
# ----------------------------------------------------------------------------------------------


def predict_field(
    image: np.ndarray,
    cells: np.ndarray,
    classifiers: Sequence[Classifier],
    tta: bool = False,
    image_weight: float = 0.3,
    seconds: dict[str, float] | None = None,
    on_crops: Callable[[CropSpec, CellCrops], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell class scores of one segmented field.

    Each model's cells are cropped with the crop spec of its ``model.json`` (models sharing a spec
    share the crops; ``on_crops(spec, batch)`` sees every batch). Returns ``(cell_ids (N,),
    scores (N, 19))``, averaged over models and TTA views, then fused.
    """
    seconds = seconds if seconds is not None else {}
    by_crop: dict[CropSpec, list[Classifier]] = {}
    for clf in classifiers:
        by_crop.setdefault(clf.loaded.spec.crop, []).append(clf)
    cell_ids: np.ndarray | None = None
    total = None
    for spec, group in by_crop.items():
        ids_parts, score_parts = [], []
        t0 = time.perf_counter()
        for batch in spec.iter_crops(image, cells, batch_size=max(clf.batch_size for clf in group)):
            if on_crops is not None:
                on_crops(spec, batch)
            t1 = time.perf_counter()
            seconds["crop"] = seconds.get("crop", 0.0) + t1 - t0
            s = sum(clf(batch.crops, tta) for clf in group)
            ids_parts.append(batch.cell_ids)
            score_parts.append(s)
            t0 = time.perf_counter()
            seconds["model"] = seconds.get("model", 0.0) + t0 - t1
        ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
        scores = np.concatenate(score_parts) if score_parts else np.zeros((0, NUM_CLASSES))
        if cell_ids is None:
            cell_ids, total = ids, scores
        else:
            if not np.array_equal(ids, cell_ids):
                raise AssertionError("crop groups disagree on the cells of a field")
            total = total + scores
    assert cell_ids is not None and total is not None
    scores = np.clip(total / len(classifiers), 0.0, 1.0)
    return cell_ids, fuse_scores(scores, image_weight)


def field_components(
    image: np.ndarray,
    cells: np.ndarray,
    field_models: Sequence[FieldModel],
    tta: bool = False,
    seconds: dict[str, float] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(cell_ids (N,) ascending, {"image": (N, 19), "cam": (N, 19)})`` of one segmented field from
    its image-level models (averaged over models): the image probability broadcast to every cell,
    and each cell's CAM score (``hpa_tf.cam.cell_cam_scores``)."""
    from hpa_tf.cam import cell_cam_scores

    if not field_models:
        raise ValueError("field_components needs at least one field model")
    seconds = seconds if seconds is not None else {}
    t0 = time.perf_counter()
    probs, cams, cell_ids = [], [], None
    for fm in field_models:
        p, maps = fm(image, tta)
        cell_ids, cam = cell_cam_scores(maps, cells)
        probs.append(p)
        cams.append(cam)
    seconds["field_model"] = seconds.get("field_model", 0.0) + time.perf_counter() - t0
    image_p = np.mean(probs, axis=0)
    return cell_ids, {"image": np.broadcast_to(image_p, (len(cell_ids), NUM_CLASSES)).copy(),
                      "cam": np.mean(cams, axis=0)}


def predict_components(
    image: np.ndarray,
    cells: np.ndarray,
    classifiers: Sequence[Classifier],
    field_models: Sequence[FieldModel] = (),
    tta: bool = False,
    seconds: dict[str, float] | None = None,
    on_crops: Callable[[CropSpec, CellCrops], None] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(cell_ids (N,), {component: (N, 19)})`` of one segmented field: ``cell`` from the cell models
    (``predict_field`` without fusion), ``image`` and ``cam`` from the field models."""
    components: dict[str, np.ndarray] = {}
    cell_ids = None
    if classifiers:
        cell_ids, components["cell"] = predict_field(image, cells, classifiers, tta, 0.0, seconds, on_crops)
    if field_models:
        ids, parts = field_components(image, cells, field_models, tta, seconds)
        if cell_ids is not None and not np.array_equal(ids, cell_ids):
            raise AssertionError("cell and field models disagree on the cells of a field")
        cell_ids = ids
        components.update(parts)
    if cell_ids is None:
        raise ValueError("predict_components needs a cell model or a field model")
    return cell_ids, components


def prediction_string(cells: np.ndarray, cell_ids: np.ndarray, scores: np.ndarray) -> str:
    """All 19 ``label confidence mask`` triples for every cell, masks at full resolution."""
    masks = encode_cells(cells, [int(i) for i in cell_ids])
    preds = [
        Prediction(c, float(scores[k, c]), masks[int(cid)])
        for k, cid in enumerate(cell_ids)
        for c in range(NUM_CLASSES)
    ]
    return format_prediction_string(preds)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def _requested(config: PredictConfig) -> list[tuple[str, int | None, int | None]]:
    if config.ids:
        return [(i, None, None) for i in config.ids]
    if config.sample_submission:
        return [(r.image_id, r.width, r.height) for r in read_sample_submission(config.sample_submission)]
    if not Path(config.test_dir).is_dir():
        raise PredictError(f"test folder not found: {config.test_dir}")
    ids = list_image_ids(config.test_dir)
    if not ids:
        raise PredictError(f"no fields ({{ID}}_{{red,green,blue,yellow}}.png|jpg|tif) in {config.test_dir}")
    return [(i, None, None) for i in ids]


def _cache_dir(config: PredictConfig) -> Path:
    """A cache folder keyed on every setting that changes a field's predictions."""
    key = {
        k: v for k, v in asdict(config).items()
        if k in ("test_dir", "segmenter", "nuclei_model", "cell_model", "masks_dir", "tta", "image_weight", "fusion", "component_scores",
                 "fusion_weights")
    }
    for name in ("models", "field_models"):
        key[name] = [(str(Path(m).resolve()), os.path.getsize(m), os.path.getmtime(m)) for m in getattr(config, name) or ()]
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    base = Path(config.cache_dir) if config.cache_dir else Path(f"{config.out}.cache")
    return base / digest


def run(config: PredictConfig, segmenter=None, on_crops: CropsHook | None = None) -> dict:
    """Predict every requested field and write the submission CSV; returns a summary dict.

    Every requested ID gets a row: a field with no cells, or one that cannot be read, gets an
    empty PredictionString and is listed in the summary (``failed``, ``no_cells``).
    ``on_crops(image_id, crop_spec, batch)`` is called with every batch of crops (a
    ``hpa_tf.crops.CellCrops``) that the models are given, e.g. to look at what a model sees;
    fields taken from the cache are not cropped again.
    """
    from hpa_tf.distribute import enable_memory_growth
    from hpa_tf.segmentation import preload

    check_models(config)
    preload(config.segmenter)  # hpacellseg: PyTorch's stack before TensorFlow
    enable_memory_growth()  # let PyTorch (hpacellseg) share the GPU
    # every check before the cache folder exists: a refused start leaves nothing behind
    requested = _requested(config)
    check_model_files([*(config.models or ()), *(config.field_models or ())])
    cache = _cache_dir(config)
    if segmenter is None:
        segmenter = _LazySegmenter(config)
        if _needs_segmenter(config, requested, cache):
            segmenter.build()  # a segmenter that cannot be made stops the run before any output
    classifiers = [Classifier(m, config.batch_size) for m in load_models(config.models, "cell")] if config.models else []
    field_models = [FieldModel(m) for m in load_models(config.field_models, "field")] if config.field_models else []
    cache.mkdir(parents=True, exist_ok=True)  # after the models load: a refused model leaves no folder

    bar = None
    if config.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(requested), desc="predict", unit="field")
    results: list[FieldResult] = []
    t_start = time.perf_counter()
    n_cached = 0
    for image_id, width, height in requested:
        cached = cache / f"{image_id}.json"
        if cached.is_file():
            results.append(FieldResult(**json.loads(cached.read_text())))
            n_cached += 1
        else:
            result = _one_field(config, image_id, width, height, classifiers, segmenter, on_crops, field_models)
            if result.status != "error":  # errors are retried on the next run
                with atomic_open(cached, "w") as f:
                    json.dump(asdict(result), f)
            results.append(result)
        if bar is not None:
            bar.update()
            done = [r for r in results if r.seconds]
            if done:
                bar.set_postfix(cells=f"{np.mean([r.n_cells for r in results]):.0f}/field")
    if bar is not None:
        bar.close()

    write_submission(
        config.out,
        (SubmissionRow(r.image_id, r.width or 1, r.height or 1, parse_prediction_string(r.prediction_string))
         for r in results),
    )
    components_path = None
    if config.component_scores:
        components_path = write_components(components_file(config.out), results)
    timed = [r for r in results if r.seconds]
    summary = {
        "fields": len(results),
        "cells": int(sum(r.n_cells for r in results)),
        "cells_per_field": float(np.mean([r.n_cells for r in results])) if results else 0.0,
        "cached": n_cached,
        "failed": [(r.image_id, r.error) for r in results if r.status == "error"],
        "no_cells": [r.image_id for r in results if r.status == "no_cells"],
        "seconds_per_field": {
            s: float(np.mean([r.seconds.get(s, 0.0) for r in timed])) if timed else 0.0 for s in STAGES
        },
        "seconds": round(time.perf_counter() - t_start, 2),
        "out": str(config.out),
        "components": components_path,
    }
    return summary


def check_models(config: PredictConfig) -> None:
    """PredictError unless some model is given and the fusion settings make sense for them."""
    from hpa_tf.config import parse_weights

    if not config.models and not config.field_models:
        raise PredictError("no model given: pass --model CELL.keras and/or --field-model FIELD.keras")
    try:
        weights = parse_weights(config.fusion_weights)
    except ValueError as e:
        raise PredictError(str(e)) from None
    present = (["cell"] if config.models else []) + (["image", "cam"] if config.field_models else [])
    try:
        fuse_components({n: np.zeros((1, NUM_CLASSES)) for n in present}, config.fusion, weights)
    except ValueError as e:
        raise PredictError(f"--fusion {config.fusion or 'default'} --fusion-weights "
                           f"{','.join(f'{w:g}' for w in weights)}: {e}") from None


def components_file(out: str | os.PathLike) -> str:
    """Where ``component_scores`` writes: ``submission.csv`` → ``submission.components.json``."""
    path = Path(out)
    return str(path.with_name(path.stem + ".components.json"))


def write_components(path: str | os.PathLike, results: Sequence[FieldResult]) -> str:
    """Write every field's per-cell component scores (atomically): ``{"components": [...], "fields":
    {image_id: {"cell_ids": [...], "<component>": [[19 floats] per cell]}}}``, the cells in the order of
    their predictions in the submission."""
    fields = {r.image_id: {"cell_ids": r.cell_ids, **r.components} for r in results if r.cell_ids}
    names = [c for c in COMPONENTS if any(c in r.components for r in results)]
    with atomic_open(path, "w") as f:
        json.dump({"components": names, "fields": fields}, f)
    return str(path)


def read_components(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """``{image_id: {"cell_ids": (N,), component: (N, 19)}}`` from ``write_components``' file."""
    data = json.loads(Path(path).read_text())
    return {image_id: {k: np.asarray(v) for k, v in entry.items()} for image_id, entry in data["fields"].items()}


def component_rows(rows: Sequence[SubmissionRow], components: dict[str, dict[str, np.ndarray]],
                   scores: Callable[[dict[str, np.ndarray]], np.ndarray]) -> list[SubmissionRow]:
    """The submission ``rows`` (as written by ``run``: every cell with all 19 classes, in the order of
    the component file's ``cell_ids``) with each field's confidences replaced by
    ``scores(components[image_id])`` (an (N, 19) array), e.g. one component or another fusion; the
    masks are kept, so the metric scores the same cells."""
    out = []
    for row in rows:
        entry = components.get(row.image_id)
        if entry is None or not row.predictions:
            out.append(SubmissionRow(row.image_id, row.width, row.height, list(row.predictions)))
            continue
        values = np.asarray(scores(entry), np.float64)
        n = len(entry["cell_ids"])
        if values.shape != (n, NUM_CLASSES) or len(row.predictions) != n * NUM_CLASSES:
            raise ValueError(f"{row.image_id}: {len(row.predictions)} predictions, components for {n} cells")
        flat = values.ravel()
        preds = [Prediction(p.label, float(flat[k]), p.mask) for k, p in enumerate(row.predictions)]
        if any(p.label != k % NUM_CLASSES for k, p in enumerate(preds)):
            raise ValueError(f"{row.image_id}: predictions are not every class of every cell in order")
        out.append(SubmissionRow(row.image_id, row.width, row.height, preds))
    return out


def _needs_segmenter(config: PredictConfig, requested: Sequence[tuple], cache: Path) -> bool:
    """Whether some requested field has neither a cached result nor a saved mask."""
    for image_id, _, _ in requested:
        if (cache / f"{image_id}.json").is_file():
            continue
        if config.masks_dir and (Path(config.masks_dir) / f"{image_id}_cells.png").is_file():
            continue
        return True
    return False


class _LazySegmenter:
    """Builds the configured segmenter on first use (never, when every mask is reused)."""

    def __init__(self, config: PredictConfig):
        self.config = config
        self._segmenter = None

    def build(self) -> None:
        """Create the segmenter now; raises PredictError (one line, what to do) when it cannot be."""
        from hpa_tf.segmentation import SEGMENTER_ERRORS, get_segmenter

        c = self.config
        options = {}
        if c.segmenter == "hpacellseg":
            options = {"nuclei_model": c.nuclei_model, "cell_model": c.cell_model, "device": c.device}
        try:
            self._segmenter = get_segmenter(c.segmenter, **options)
        except SEGMENTER_ERRORS as e:
            raise PredictError(f"segmenter {c.segmenter}: {e}") from None

    def segment(self, image: np.ndarray):
        if self._segmenter is None:
            self.build()
        return self._segmenter.segment(image)


def _one_field(config, image_id, width, height, classifiers, segmenter, on_crops=None, field_models=()) -> FieldResult:
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        image = read_rgby(config.test_dir, image_id)
    except ImageReadError as e:
        log.warning("%s: skipped: %s", image_id, e)
        return FieldResult(image_id, width or 0, height or 0, status="error", error=str(e))
    h, w = image.shape[:2]
    if (width, height) != (None, None) and (width, height) != (w, h):
        log.warning("%s: sample submission says %sx%s but the files are %dx%d; using the files' size",
                    image_id, width, height, w, h)
    seconds["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cells = None
    if config.masks_dir:
        mask_path = Path(config.masks_dir) / f"{image_id}_cells.png"
        if mask_path.is_file():
            cells = read_label_image(mask_path)
            if cells.shape != (h, w):
                return FieldResult(image_id, w, h, status="error",
                                   error=f"{mask_path}: mask size {cells.shape[::-1]} differs from the field's {(w, h)}")
    if cells is None:
        cells, _ = segmenter.segment(image)
    seconds["segment"] = time.perf_counter() - t0
    if cells.max() == 0:
        return FieldResult(image_id, w, h, status="no_cells", seconds=seconds)
    hook = None if on_crops is None else (lambda spec, batch: on_crops(image_id, spec, batch))
    cell_ids, components = predict_components(image, cells, classifiers, field_models, config.tta, seconds, hook)
    if len(cell_ids) == 0:
        return FieldResult(image_id, w, h, status="no_cells", seconds=seconds)
    if field_models:
        from hpa_tf.config import parse_weights

        scores = fuse_components(components, config.fusion, parse_weights(config.fusion_weights))
    else:
        scores = fuse_scores(components["cell"], config.image_weight)
    t0 = time.perf_counter()
    text = prediction_string(cells, cell_ids, scores)
    seconds["encode"] = time.perf_counter() - t0
    kept = {k: np.round(v, 6).tolist() for k, v in components.items()} if config.component_scores else {}
    return FieldResult(image_id, w, h, prediction_string=text, n_cells=len(cell_ids), seconds=seconds,
                       cell_ids=[int(i) for i in cell_ids], components=kept)
