"""Reading raw datasets (CSV-listed or ImageFolder) and the prepared array cache."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from components.core.errors import DataError
from components.data.decoding import decode  # noqa: F401 (callers read one image through this module too)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
MAX_LISTED_PROBLEMS = 200


def list_dataset(data: DictConfig, root: Path) -> pd.DataFrame:
    """One row per image: file (relative to root), label, and every sensitive attribute."""
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found (data.root)")
    if data.format == "imagefolder":
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.parent != root)
        table = pd.DataFrame(
            {data.file_column: [p.relative_to(root).as_posix() for p in files], data.label_column: [p.parent.name for p in files]}
        )
        if data.metadata and (root / data.metadata).exists():
            extra = _read_csv(root / data.metadata).drop(columns=[data.label_column], errors="ignore")
            table = table.merge(extra, on=data.file_column, how="left")
    else:
        table = _read_csv(root / data.metadata)
    required = [data.file_column, data.label_column, *data.sensitive_attributes]
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise DataError(f"{root / (data.metadata or '')}: missing column(s) {missing}; columns are {list(table.columns)}")
    return table[required].rename(columns={data.file_column: "file", data.label_column: "label"})


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"{path}: metadata file not found (data.metadata)")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from None


def row_problems(table: pd.DataFrame, data: DictConfig, source: str) -> list[str]:
    """Every problem with the listing itself (labels, attributes, duplicates), one line each.

    Checks run column-wise (a 100k-row listing takes milliseconds); only flagged rows are visited.
    """
    files, labels = table["file"], table["label"]
    checks = [(files == "", lambda i: "empty file name"),
              (files.duplicated(keep="first"), lambda i: "file listed twice"),
              (labels == "", lambda i: "missing label"),
              ((labels != "") & ~labels.isin(list(data.classes)), lambda i: f"label {labels.iloc[i]!r} is not in data.classes")]
    for attr in data.sensitive_attributes:
        checks.append((table[attr].isna() | (table[attr] == ""), lambda i, attr=attr: f"missing sensitive attribute {attr!r}"))
    masks = [mask.to_numpy() for mask, _ in checks]
    problems = []
    for i in np.flatnonzero(np.logical_or.reduce(masks)):
        where = f"{source} row {i + 2} ({files.iloc[i] or '<empty file name>'})"
        problems += [f"{where}: {message(i)}" for mask, (_, message) in zip(masks, checks) if mask[i]]
    return problems


def format_problems(problems: list[str]) -> str:
    shown = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(shown)
    return f"{len(problems)} problem(s) in the data:\n  " + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")


@dataclass
class Prepared:
    """The output of prepare: uint8 images (N, C, H, W), the index table and the metadata."""

    images: np.ndarray
    index: pd.DataFrame
    meta: dict

    def split(self, name: str) -> tuple[np.ndarray, pd.DataFrame]:
        rows = np.flatnonzero((self.index["split"] == name).to_numpy())
        part = self.index.iloc[rows].reset_index(drop=True)
        for column in part.select_dtypes("category").columns:  # only the groups this split has
            part[column] = part[column].cat.remove_unused_categories()
        return np.array(self.images[rows]), part


def load_prepared(prepared_dir: str | Path) -> Prepared:
    prepared_dir = Path(prepared_dir)
    meta_file = prepared_dir / "prepared.json"
    if not meta_file.exists():
        raise DataError(f"{prepared_dir}: not a prepared dataset (no prepared.json); run the prepare step first")
    meta = json.loads(meta_file.read_text())
    # Few distinct values per column: categorical (a code per row), a third of the memory of strings at 1M rows.
    grouped = {column: "category" for column in ("label", "split", *meta["sensitive_attributes"])}
    index = pd.read_csv(prepared_dir / "index.csv", dtype={"file": str, **grouped}, keep_default_na=False)
    images = np.load(prepared_dir / "images.npy", mmap_mode="r")
    return Prepared(images=images, index=index, meta=meta)
