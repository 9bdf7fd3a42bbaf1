"""prepare: validate the raw data, split it, decode it once into a uint8 array cache and
save reference statistics for drift monitoring.

Outputs (in `out_dir`): images.npy (N, C, H, W uint8), index.csv (file, label,
label_index, split, sensitive attributes; row i is images.npy[i]), prepared.json
(classes, shapes, normalisation, counts, lineage), reference_stats.json.
"""

from __future__ import annotations

from components.core.cli import run_step, step_command

if __name__ == "__main__":  # before the imports below (numpy, pandas): a bad config is refused at once
    command = step_command("Validate, split and cache the raw dataset.",
                           data=None, out="artifacts/prepared")

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from components.core.config.sections import select
from components.core.errors import DataError
from components.core.io import atomic_dir, write_json
from components.core.lineage import lineage
from components.data.dataset import format_problems, list_dataset, row_problems
from components.data.decoding import Decoding, RowStats, decoding_pool
from components.drift.features import reference_histograms


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


def check_split_sizes(table: pd.DataFrame, data: DictConfig) -> str | None:
    """An error where a class would miss from a split; the warning (returned, for the caller to print
    once the data passed) for classes and (class, group) cells smaller than data.warn_below images
    (their numbers will be noise)."""
    needed = ["train", "test"] + (["val"] if data.split.val > 0 else [])
    counts = pd.crosstab(table["label"], table["split"]).reindex(index=list(data.classes), columns=needed, fill_value=0)
    empty = [f"class {label!r} has no {split} image ({int(counts.loc[label].sum())} image(s) in all)"
             for label in counts.index for split in needed if counts.loc[label, split] == 0]
    if empty:
        raise DataError("too few images to split (data.split): " + "; ".join(empty) + "; add images or drop the class from data.classes")
    sizes = {f"class {label!r}": n for label, n in table["label"].value_counts().items()}
    for attr in data.sensitive_attributes:
        sizes |= {f"class {label!r} x {attr} {group!r}": n for (label, group), n in table.groupby(["label", attr]).size().items()}
    small = [f"{name}: {n}" for name, n in sorted(sizes.items()) if n < data.warn_below]
    if small:
        return (f"warning: {len(small)} class(es) or group cell(s) with fewer than data.warn_below={data.warn_below} images "
                f"(their metrics will be noise): {', '.join(small[:20])}")
    return None


def channel_stats(stats: RowStats, rows: np.ndarray, pixels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units over `rows`, from exact integer sums."""
    count = len(rows) * pixels
    mean = stats.sums[rows].sum(axis=0) / (255.0 * count)
    mean_square = stats.squares[rows].sum(axis=0) / (255.0**2 * count)
    std = np.sqrt(np.maximum(mean_square - mean**2, 1e-12))
    return mean.round(6).tolist(), std.round(6).tolist()


def _assign_splits(table: pd.DataFrame, data: DictConfig, seed: int) -> str | None:
    """Add label_index and a train/val/test split stratified by label and sensitive group; returns
    check_split_sizes's warning."""
    table["label_index"] = table["label"].map({c: i for i, c in enumerate(data.classes)}).astype(int)
    strata = table["label"].str.cat([table[a] for a in data.sensitive_attributes], sep="|")
    table["split"] = stratified_split(strata, data.split.val, data.split.test, seed)
    return check_split_sizes(table, data)


def _reference_stats(table: pd.DataFrame, train_rows: np.ndarray, stats: RowStats, data: DictConfig) -> dict:
    """What serving compares live inputs against: the training split's feature histograms and class mix."""
    train_labels = table["label"].to_numpy()[train_rows]
    return {
        "features": reference_histograms({name: values[train_rows] for name, values in stats.features.items()}, data.histogram_bins),
        "class_distribution": {c: float((train_labels == c).mean()) for c in data.classes},
        "n_images": len(train_rows),
    }


SECTIONS = ("seed", "data")  # the config this step reads: its DVC params and its config hash


def prepare(cfg: DictConfig, data: str | Path | None, out: str | Path) -> dict:
    """Validate the raw data in `data` (default: data.root), split it and write the cache to `out`."""
    cfg = select(cfg, SECTIONS)
    root, out_dir, data = Path(data or cfg.data.root), out, cfg.data
    table = list_dataset(data, root)
    if table.empty:
        raise DataError(f"{root}: the dataset lists no images")
    source = str(root / data.metadata) if data.metadata else str(root)
    channels, size = data.channels, (data.image_size[0], data.image_size[1])
    with decoding_pool(len(table)) as pool, atomic_dir(out_dir) as tmp:  # the workers start while the rows are checked
        problems, flagged = row_problems(table, data, root, source)  # flagged rows are never decoded
        table = table.drop(columns="line")
        files = table["file"].to_numpy(dtype=object, copy=True)
        files[flagged] = None
        decoding = Decoding(tmp / "images.npy", root, files, channels, size, pool)
        # While the workers decode: the split, the index and the lineage. They count only if every row and
        # file is good: a split error is raised after the data's problems, its warning printed after too.
        split_error, warning, provenance = None, None, None
        if not problems:
            try:
                warning = _assign_splits(table, data, cfg.seed)
            except DataError as exc:
                split_error = exc
            else:
                table.to_csv(tmp / "index.csv", index=False)
                provenance = lineage(cfg, __spec__.name)
        decode_problems, stats = decoding.result()
        problems += decode_problems
        if problems:
            raise DataError(format_problems(problems))
        if split_error:
            raise split_error
        if warning:
            print(warning, file=sys.stderr)

        train_rows = np.flatnonzero(table["split"].to_numpy() == "train")
        mean, std = channel_stats(stats, train_rows, size[0] * size[1])
        meta = {
            "classes": list(data.classes),
            "channels": channels,
            "image_size": list(size),
            "normalization": {"mean": mean, "std": std},
            "sensitive_attributes": list(data.sensitive_attributes),
            "counts": {s: int((table["split"] == s).sum()) for s in ("train", "val", "test")},
            "groups": {a: table[a].value_counts().sort_index().to_dict() for a in data.sensitive_attributes},
            "data_config": OmegaConf.to_container(data),
            "lineage": provenance,
        }
        write_json(tmp / "prepared.json", meta)
        write_json(tmp / "reference_stats.json", _reference_stats(table, train_rows, stats, data) | {"lineage": meta["lineage"]})
    return meta


if __name__ == "__main__":
    run_step(command, prepare, lambda meta, args: f"prepare: {meta['counts']} images, groups {meta['groups']} -> {args.out}")
