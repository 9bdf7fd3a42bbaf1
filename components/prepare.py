"""prepare: validate the raw data, split it, decode it once into a uint8 array cache and
save reference statistics for drift monitoring.

Outputs (in `out_dir`): images.npy (N, C, H, W uint8), index.csv (file, label,
label_index, split, sensitive attributes; row i is images.npy[i]), prepared.json
(classes, shapes, normalisation, counts, lineage), reference_stats.json.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from components.core.cli import run_step
from components.core.config import select
from components.data.dataset import format_problems, list_dataset, row_problems
from components.data.decoding import RowStats, decode_all
from components.core.errors import DataError
from components.features import reference_histograms
from components.core.io import atomic_dir, write_json
from components.core.lineage import lineage


def stratified_split(strata: pd.Series, val: float, test: float, seed: int) -> np.ndarray:
    """Assign train/val/test inside every stratum so each split keeps the stratum mix."""
    rng = np.random.default_rng(seed)
    split = np.full(len(strata), "train", dtype=object)
    for key in sorted(strata.unique()):
        rows = np.flatnonzero(strata.to_numpy() == key)
        rng.shuffle(rows)
        n_test, n_val = round(len(rows) * test), round(len(rows) * val)
        split[rows[:n_test]] = "test"
        split[rows[n_test : n_test + n_val]] = "val"
    return split


def channel_stats(stats: RowStats, rows: np.ndarray, pixels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units over `rows`, from exact integer sums."""
    count = len(rows) * pixels
    mean = stats.sums[rows].sum(axis=0) / (255.0 * count)
    mean_square = stats.squares[rows].sum(axis=0) / (255.0**2 * count)
    std = np.sqrt(np.maximum(mean_square - mean**2, 1e-12))
    return mean.round(6).tolist(), std.round(6).tolist()


SECTIONS = ("seed", "data")  # the config this step reads: its DVC params and its config hash


def prepare(cfg: DictConfig, data: str | Path | None, out: str | Path) -> dict:
    """Validate the raw data in `data` (default: data.root), split it and write the cache to `out`."""
    cfg = select(cfg, SECTIONS)
    root, out_dir, data = Path(data or cfg.data.root), out, cfg.data
    table = list_dataset(data, root)
    if table.empty:
        raise DataError(f"{root}: the dataset lists no images")
    source = str(root / data.metadata) if data.format == "csv" else str(root)
    problems = row_problems(table, data, source)
    channels, size = data.channels, (data.image_size[0], data.image_size[1])

    with atomic_dir(out_dir) as tmp:
        decode_problems, stats = decode_all(tmp / "images.npy", root, table["file"].tolist(), channels, size)
        problems += decode_problems
        if problems:
            raise DataError(format_problems(problems))

        table["label_index"] = table["label"].map({c: i for i, c in enumerate(data.classes)}).astype(int)
        strata = table["label"].str.cat([table[a] for a in data.sensitive_attributes], sep="|")
        table["split"] = stratified_split(strata, data.split.val, data.split.test, cfg.seed)
        table.to_csv(tmp / "index.csv", index=False)

        train_rows = np.flatnonzero(table["split"].to_numpy() == "train")
        mean, std = channel_stats(stats, train_rows, size[0] * size[1])
        features = {name: values[train_rows] for name, values in stats.features.items()}
        counts = {s: int((table["split"] == s).sum()) for s in ("train", "val", "test")}
        groups = {a: table[a].value_counts().sort_index().to_dict() for a in data.sensitive_attributes}
        meta = {
            "classes": list(data.classes),
            "channels": channels,
            "image_size": list(size),
            "normalization": {"mean": mean, "std": std},
            "sensitive_attributes": list(data.sensitive_attributes),
            "counts": counts,
            "groups": groups,
            "data_config": OmegaConf.to_container(data),
            "lineage": lineage(cfg, __name__),
        }
        write_json(tmp / "prepared.json", meta)
        train_labels = table["label"].to_numpy()[train_rows]
        write_json(
            tmp / "reference_stats.json",
            {
                "features": reference_histograms(features, data.histogram_bins),
                "class_distribution": {c: float((train_labels == c).mean()) for c in data.classes},
                "n_images": len(train_rows),
                "lineage": meta["lineage"],
            },
        )
    return meta


if __name__ == "__main__":
    run_step(prepare, "Validate, split and cache the raw dataset.",
             lambda meta, args: f"prepare: {meta['counts']} images, groups {meta['groups']} -> {args.out}",
             data=None, out="artifacts/prepared")
