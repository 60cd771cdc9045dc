"""`python -m hpa_tf demo --quick`: the README's main command, end to end, and its resume."""

import json

from hpa_tf.demo import PRESETS, main
from hpa_tf.io import read_sample_submission
from hpa_tf.submission import validate_submission


def test_quick_demo_runs_end_to_end_learns_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for stage in range(1, 7):
        assert f"[{stage}/6]" in printed
    figures = json.loads((out / "figures.json").read_text())
    # learning for real: every component scored beside chance and the ceiling; the fusion beats chance
    assert set(figures["components"]) == {"cell", "image", "cam", "fusion"}
    assert figures["mAP"] > figures["random_mAP"] and figures["skill"] > 0.2
    assert figures["components"]["cell"]["skill"] > 0.2  # (the CAM's own test is in test_field.py)
    assert figures["random_mAP"] < figures["mAP"] < figures["ceiling_mAP"] <= 1
    assert figures["segmentation"]["cell_recall"] >= 0.8
    metric = json.loads((out / "metric.json").read_text())
    assert all(c["n_truth"] > 0 for c in metric["components"]["fusion"]["classes"])  # every class has truth
    assert len(metric["fusion"]["validation"]) > 10  # chosen among candidates on the validation fold
    report = (out / "report.md").read_text()
    assert f"| **{figures['skill']:.3f}** |" in report and "contrast-stretched for display" in report
    for picture in ("training", "training_field", "per_class_ap", "segmentation", "cells"):
        assert f"pictures/{picture}.png" in report
        assert (out / "pictures" / f"{picture}.png").stat().st_size > 10_000
    ids = [r.image_id for r in read_sample_submission(out / "data" / "sample_submission.csv")]
    assert validate_submission(out / "submission.csv", expected_ids=ids) == []

    # a second run keeps every finished stage and reports the same result
    assert main(["--quick", "--out", str(out)]) == 0
    again = capsys.readouterr().out
    stages = again.split("\n[")  # "[n/6] title" and what the stage printed
    for n in (1, 2, 3, 4):  # data, shards, training, prediction: each says it kept its work
        text = next(t for t in stages if t.startswith(f"{n}/6]"))
        assert "kept" in text, text
    assert f"cell model: already trained ({PRESETS['quick'].epochs} epochs), kept" in again
    assert json.loads((out / "figures.json").read_text())["mAP"] == figures["mAP"]
