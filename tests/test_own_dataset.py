"""Bring your own data: one file in conf/data/ configures a different dataset end to end, and
nothing of the sample (its name, its classes' story, its simulated attribute) leaks out."""

from __future__ import annotations

import json
import re
import zipfile

import pytest

from tests.helpers.datasets import make_image_dataset
from tests.helpers.project import copy_project, run

SAMPLE_WORDS = re.compile(r"\b(digits?|handwritten|site(_[ab])?|scikit-learn)\b", re.IGNORECASE)

SHAPES_YAML = """
name: shapes
root: {root}
format: imagefolder
metadata: metadata.csv
file_column: file
label_column: label
classes: [circle, square, star]
sensitive_attributes: [camera]
channels: 3
image_size: [20, 20]
split:
  val: 0.2
  test: 0.25
warn_below: 5
histogram_bins: 10
intended_use: Sorts photos of hand-drawn shapes for a classroom game.
limitations:
  - Photographed with two cameras only.
"""


@pytest.mark.slow
def test_a_second_dataset_is_one_config_file_and_no_output_mentions_the_sample(tmp_path):
    repo = copy_project(tmp_path / "repo", with_data=False)
    data = make_image_dataset(tmp_path / "shapes", classes=("circle", "square", "star"), per_class=20, channels=3,
                              size=(24, 24), fmt="imagefolder", attribute="camera")
    (repo / "conf" / "data" / "shapes.yaml").write_text(SHAPES_YAML.format(root=data))
    overrides = ["data=shapes", "train.epochs=2", "evaluate.attribution_samples=2", "evaluate.bootstrap_samples=50",
                 "gate.on_fail=warn"]  # 2 epochs on 60 images: the quality gate would close
    for step, paths in (("prepare", []), ("train", []), ("evaluate", []), ("package", [])):
        run(["python", "-m", f"components.{step}", *paths, *overrides], repo)

    package = json.loads((repo / "artifacts" / "package" / "package.json").read_text())
    assert package["model_name"] == "shapes"
    with zipfile.ZipFile(repo / "artifacts" / "package" / "shapes.mar") as mar:
        manifest = mar.read("MAR-INF/MANIFEST.json").decode()
        signature = mar.read("signature.json").decode()
    card = (repo / "reports" / "model_card.md").read_text()
    assert "Sorts photos of hand-drawn shapes" in card and "Photographed with two cameras only." in card
    outputs = {
        "model card": card,
        "evaluation.html": (repo / "reports" / "evaluation.html").read_text(),
        "metrics.json": (repo / "reports" / "metrics.json").read_text(),
        "fairness.json": (repo / "reports" / "fairness.json").read_text(),
        "package.json": json.dumps(package),
        "MANIFEST.json": manifest,
        "signature.json": signature,
    }
    leaks = {name: sorted({m.group(0) for m in SAMPLE_WORDS.finditer(text)}) for name, text in outputs.items() if SAMPLE_WORDS.search(text)}
    assert leaks == {}
