"""prepare: validation names every bad row/file and writes nothing; splits, cache, statistics."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.core.errors import DataError
from components.core.paths import ROOT
from components.data import decoding
from components.data.dataset import load_prepared, outside_root
from components.drift import features
from components.drift.features import FEATURES
from components.prepare import prepare, stratified_split
from tests.helpers.datasets import make_image_dataset, small_config


def test_outputs_cache_index_and_statistics(tiny_dataset, tmp_path):
    meta = prepare(small_config(tiny_dataset), tiny_dataset, tmp_path / "out")
    prepared = load_prepared(tmp_path / "out")
    assert prepared.images.dtype == np.uint8 and prepared.images.shape == (36, 1, 16, 16)
    assert meta["counts"] == {"train": 24, "val": 6, "test": 6}
    assert list(prepared.index.columns) == ["file", "label", "site", "label_index", "split"]
    # Row i of the cache is the decoded, resized file in row i of the index.
    row = prepared.index.iloc[5]
    expected = np.asarray(Image.open(tiny_dataset / row["file"]).convert("L").resize((16, 16), Image.BILINEAR))
    assert np.array_equal(prepared.images[5, 0], expected)
    stats = json.loads((tmp_path / "out" / "reference_stats.json").read_text())
    assert set(stats["features"]) == set(FEATURES)
    assert sum(stats["features"]["brightness"]["counts"]) == 24 == stats["n_images"]
    assert stats["class_distribution"] == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert set(meta["lineage"]) == {"data_hash", "config_hash", "code_hash", "environment"}


def test_split_is_stratified_by_label_and_group_and_seeded():
    strata = pd.Series([f"{label}|g{i % 2}" for label in "abcd" for i in range(40)])
    split = stratified_split(strata, 0.25, 0.25, seed=1)
    table = pd.DataFrame({"stratum": strata, "split": split})
    per_cell = table.groupby(["stratum", "split"]).size().unstack()
    assert (per_cell["test"] == 5).all() and (per_cell["val"] == 5).all() and (per_cell["train"] == 10).all()
    assert np.array_equal(split, stratified_split(strata, 0.25, 0.25, seed=1))
    assert not np.array_equal(split, stratified_split(strata, 0.25, 0.25, seed=2))


def test_imagefolder_rgb_any_size_by_config_alone(tmp_path):
    data = make_image_dataset(tmp_path / "raw", classes=("cat", "dog"), channels=3, size=(30, 41), fmt="imagefolder", attribute="camera")
    cfg = small_config(data, "data.format=imagefolder", "data.sensitive_attributes=[camera]", "data.image_size=[12,20]",
                       classes=("cat", "dog"), channels=3)
    meta = prepare(cfg, data, tmp_path / "out")
    assert load_prepared(tmp_path / "out").images.shape == (24, 3, 12, 20)
    assert meta["groups"] == {"camera": {"g0": 12, "g1": 12}}


def test_grayscale_source_converted_to_rgb(tiny_dataset, tmp_path):
    prepare(small_config(tiny_dataset, channels=3), tiny_dataset, tmp_path / "out")
    images = load_prepared(tmp_path / "out").images
    assert images.shape[1] == 3 and np.array_equal(images[:, 0], images[:, 2])


@pytest.mark.parametrize("spawned", [False, True], ids=["in-process", "two-workers"])
def test_every_bad_row_and_file_is_named_and_nothing_is_written(tiny_dataset, tmp_path, monkeypatch, spawned):
    if spawned:  # the workers start before the rows are checked: row and file problems still come together
        monkeypatch.setattr(decoding, "CHUNK_ROWS", 5)
        monkeypatch.setattr(decoding, "available_cores", lambda: 2)
    meta = tiny_dataset / "metadata.csv"
    lines = meta.read_text().splitlines()
    lines[1] = lines[1].replace(",a,", ",,")             # missing label
    lines[2] = lines[2].replace(",a,", ",zebra,")        # label outside data.classes
    lines[3] = lines[3].rsplit(",", 1)[0] + ","          # missing sensitive attribute
    lines.append("does_not_exist.png,b,g0")              # missing file
    lines.append(lines[5])                               # listed twice
    meta.write_text("\n".join(lines) + "\n")
    (tiny_dataset / "img_b_000.png").write_bytes(b"not an image at all")
    truncated = tiny_dataset / "img_c_000.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("earlier output")

    with pytest.raises(DataError) as err:
        prepare(small_config(tiny_dataset), tiny_dataset, out)
    message = str(err.value)
    assert message.startswith("7 problem(s) in the data:")
    for expected in ("line 2 (img_a_000.png): missing label", "line 3 (img_a_001.png): label 'zebra' is not in data.classes",
                     "line 4 (img_a_002.png): missing sensitive attribute 'site'", "does_not_exist.png: file not found",
                     "(img_a_004.png): file listed twice", "img_b_000.png: cannot decode image", "img_c_000.png: cannot decode image"):
        assert expected in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]  # no scratch folder left behind
    assert [p.name for p in out.iterdir()] == ["previous.txt"]


def test_missing_columns_are_named(tiny_dataset, tmp_path):
    with pytest.raises(DataError, match=r"metadata.csv: no column 'region' \(data.sensitive_attributes\)"):
        prepare(small_config(tiny_dataset, "data.sensitive_attributes=[region]"), tiny_dataset, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_cli_exits_non_zero_with_the_problem_list(tiny_dataset, tmp_path):
    (tiny_dataset / "img_a_003.png").write_bytes(b"")
    result = subprocess.run(
        [sys.executable, "-m", "components.prepare", "--data", str(tiny_dataset), "--out", str(tmp_path / "out"),
         f"data.root={tiny_dataset}", "data.classes=[a,b,c]"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "error: 1 problem(s) in the data:" in result.stderr and "img_a_003.png: cannot decode image" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", ["/etc/hostname", "../outside.png", "linked/outside.png", "alias.png", "inner/../../outside.png",
                                  "inner/alias.png"])
def test_a_path_outside_the_data_folder_stops_prepare_naming_the_line(tiny_dataset, tmp_path, path):
    outside = tmp_path / "outside.png"
    outside.write_bytes((tiny_dataset / "img_a_000.png").read_bytes())
    (tiny_dataset / "linked").symlink_to(tmp_path)  # a folder symlink under data/ pointing outside it
    (tiny_dataset / "alias.png").symlink_to(outside)  # a file symlink under data/ pointing outside it
    (tiny_dataset / "inner").mkdir()
    (tiny_dataset / "inner" / "alias.png").symlink_to(outside)
    meta = tiny_dataset / "metadata.csv"
    lines = meta.read_text().splitlines()
    lines[3] = lines[3].replace("img_a_002.png", path)
    meta.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"metadata.csv line 4 \({re.escape(path)}\): path leaves the data folder"):
        prepare(small_config(tiny_dataset), tiny_dataset, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_imagefolder_metadata_rows_must_name_existing_images_and_columns_must_exist(tmp_path):
    data = make_image_dataset(tmp_path / "raw", fmt="imagefolder", attribute="camera")
    meta = data / "metadata.csv"
    meta.write_text(meta.read_text() + "b/999.png,b,g0\n")
    cfg = small_config(data, "data.format=imagefolder", "data.sensitive_attributes=[camera]")
    with pytest.raises(DataError, match=r"metadata.csv line 38 \(b/999.png\): no such image in a class folder"):
        prepare(cfg, data, tmp_path / "out")
    with pytest.raises(DataError,
                       match=r"metadata.csv: no column 'path' \(data.file_column\); its columns are \['file', 'label', 'camera'\]"):
        prepare(small_config(data, "data.format=imagefolder", "data.sensitive_attributes=[camera]", "data.file_column=path"),
                data, tmp_path / "out")


def test_a_class_too_small_to_split_is_an_error(tiny_dataset, tmp_path):
    meta = tiny_dataset / "metadata.csv"
    rows = meta.read_text().splitlines()
    meta.write_text("\n".join(row for row in rows if not row.startswith("img_c_") or row.startswith("img_c_000")) + "\n")
    with pytest.raises(DataError, match=r"too few images to split \(data.split\): class 'c' has no test image \(1 image\(s\) in all\)"):
        prepare(small_config(tiny_dataset), tiny_dataset, tmp_path / "out")


def test_the_datas_problems_come_before_a_split_error_and_no_warning_is_printed(tiny_dataset, tmp_path, monkeypatch, capsys):
    """The split runs while the workers decode; an unreadable file still wins over a class too small to split."""
    monkeypatch.setattr(decoding, "CHUNK_ROWS", 5)
    monkeypatch.setattr(decoding, "available_cores", lambda: 2)
    meta = tiny_dataset / "metadata.csv"
    rows = meta.read_text().splitlines()
    meta.write_text("\n".join(row for row in rows if not row.startswith("img_c_") or row.startswith("img_c_000")) + "\n")
    (tiny_dataset / "img_b_003.png").write_bytes(b"not an image")
    with pytest.raises(DataError) as err:
        prepare(small_config(tiny_dataset, "data.warn_below=7"), tiny_dataset, tmp_path / "out")
    assert str(err.value).startswith("1 problem(s) in the data:") and "img_b_003.png: cannot decode image" in str(err.value)
    assert "warning" not in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_small_classes_and_group_cells_get_a_named_warning(tiny_dataset, tmp_path, capsys):
    prepare(small_config(tiny_dataset, "data.warn_below=7"), tiny_dataset, tmp_path / "out")
    warning = capsys.readouterr().err
    assert "warning: 6 class(es) or group cell(s) with fewer than data.warn_below=7 images" in warning
    assert "class 'a' x site 'g0': 6" in warning and "class 'a': 12" not in warning


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_cache_is_byte_identical_with_one_or_several_decoding_processes(tiny_dataset, tmp_path, monkeypatch):
    cfg = small_config(tiny_dataset)
    prepare(cfg, tiny_dataset, tmp_path / "one")  # 36 rows: one chunk, decoded in this process
    monkeypatch.setattr(decoding, "CHUNK_ROWS", 5)  # 8 chunks over 2 spawned processes
    monkeypatch.setattr(decoding, "available_cores", lambda: 2)
    prepare(cfg, tiny_dataset, tmp_path / "many")
    assert _files(tmp_path / "one") == _files(tmp_path / "many")
    assert load_prepared(tmp_path / "many").images[:, 0].std(axis=(1, 2)).min() > 0  # every row was written


def test_bad_files_found_by_worker_processes_are_named_in_row_order(tiny_dataset, tmp_path, monkeypatch):
    (tiny_dataset / "img_c_011.png").write_bytes(b"not an image")
    (tiny_dataset / "img_a_001.png").unlink()
    monkeypatch.setattr(decoding, "CHUNK_ROWS", 4)
    problems, _ = decoding.decode_all(tmp_path / "cache.npy", tiny_dataset, [f"img_{c}_{i:03d}.png" for c in "abc" for i in range(12)],
                                   1, (16, 16), workers=3)
    assert len(problems) == 2
    assert problems[0].endswith("img_a_001.png: file not found")
    assert "img_c_011.png: cannot decode image" in problems[1]


def test_one_channel_median_is_numpys_bit_for_bit():
    """image_features reads one-channel uint8 medians from level histograms: the same float32 bits as np.median."""
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (200, 1, 32, 32), dtype=np.uint8), rng.integers(0, 256, (50, 1, 7, 9), dtype=np.uint8),
               (rng.integers(0, 3, (100, 1, 16, 16)) * 127).astype(np.uint8), np.zeros((2, 1, 4, 4), np.uint8),
               np.full((2, 1, 3, 3), 255, np.uint8), rng.integers(0, 256, (20, 1, 1, 2), dtype=np.uint8)]
    for images in batches:
        gray = features._gray(images).reshape(len(images), -1)
        fast, reference = features._median(gray, images), np.median(gray, axis=1, keepdims=True)
        assert fast.dtype == reference.dtype == np.float32 and fast.tobytes() == reference.tobytes()


def test_a_small_dataset_starts_no_worker_process(monkeypatch):
    monkeypatch.setattr(decoding, "available_cores", lambda: 4)
    with decoding.decoding_pool(decoding.CHUNK_ROWS) as pool:
        assert pool is None  # one chunk: decoded in the caller's process
    with decoding.decoding_pool(3 * decoding.CHUNK_ROWS, workers=2) as pool:
        assert pool._max_workers == 2


def test_path_check_column_wise_agrees_with_each_path_resolved(tmp_path):
    """outside_root settles plain paths per folder (one listing for its symlinks) and resolves only the rest."""
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (tmp_path / "out.png").write_bytes(b"x")
    (root / "a" / "x.png").write_bytes(b"x")
    (root / "a" / "link.png").symlink_to(tmp_path / "out.png")
    (root / "a" / "inlink.png").symlink_to(root / "a" / "x.png")
    (root / "a" / "dl").symlink_to(root / "a" / "b")
    (root / "ln").symlink_to(tmp_path)
    (root / "rootlink.png").symlink_to(tmp_path / "out.png")
    inside = ["a/x.png", "a/inlink.png", "a/dl/q.png", "top.png", "./a/x.png", "a/b/../x.png", "missing/x.png", "a//x.png", "a/."]
    outside = ["a/link.png", "ln/out.png", "rootlink.png", "./rootlink.png", "/etc/hostname", "../out.png", "a/../../out.png",
               "a/../..", "..", ".", "ln"]
    files = pd.Series(inside + outside, dtype=str)
    assert outside_root(files, root).tolist() == [False] * len(inside) + [True] * len(outside)
