"""Reading raw datasets (CSV-listed or ImageFolder) and the prepared array cache."""

from __future__ import annotations

import functools
import json
import os
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
    """One row per image: file (relative to root), label, every sensitive attribute, and `line`: the
    row's line in the metadata CSV (0 for an image found in a class folder with no metadata row)."""
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found (data.root)")
    if data.format == "imagefolder":
        table = _list_folders(data, root)
    else:
        table = _read_metadata(root / data.metadata, data, [data.file_column, data.label_column])
    table = table.rename(columns={data.file_column: "file", data.label_column: "label"})
    return table[["file", "label", *data.sensitive_attributes, "line"]]


def _list_folders(data: DictConfig, root: Path) -> pd.DataFrame:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.parent != root)
    table = pd.DataFrame({data.file_column: [p.relative_to(root).as_posix() for p in files],
                          data.label_column: [p.parent.name for p in files]})
    metadata = root / data.metadata if data.metadata else None
    if metadata is None or not metadata.exists():
        return table.assign(line=0, **{attr: "" for attr in data.sensitive_attributes})
    extra = _read_metadata(metadata, data, [data.file_column]).drop(columns=[data.label_column], errors="ignore")
    merged = table.merge(extra, on=data.file_column, how="outer", indicator=True)
    orphans = merged[merged["_merge"] == "right_only"]
    if len(orphans):
        raise DataError(format_problems([f"{metadata} line {row.line} ({row[data.file_column]}): no such image in a class folder "
                                         f"under {root}" for _, row in orphans.iterrows()]))
    return merged.drop(columns="_merge").fillna({"line": 0}).astype({"line": int})


def _read_metadata(path: Path, data: DictConfig, required: list[str]) -> pd.DataFrame:
    table = _read_csv(path)
    wanted = {data.file_column: "data.file_column", data.label_column: "data.label_column",
              **{attr: "data.sensitive_attributes" for attr in data.sensitive_attributes}}
    missing = [f"{column!r} ({key})" for column, key in wanted.items() if column not in table.columns
               and (column in required or key == "data.sensitive_attributes")]
    if missing:
        raise DataError(f"{path}: no column {', '.join(missing)}; its columns are {list(table.columns)}")
    return table.assign(line=np.arange(len(table)) + 2)  # line 1 is the header


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"{path}: metadata file not found (data.metadata)")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from None


def outside_root(files: pd.Series, root: Path) -> np.ndarray:
    """True where a listed path leaves the data folder: absolute, through `..`, or via a symlink.
    Images outside it are not in data.dvc, so DVC would not see them change."""
    real_root = os.path.realpath(root)
    real_folder = functools.lru_cache(maxsize=None)(lambda folder: os.path.realpath(os.path.join(real_root, folder)))
    links = functools.lru_cache(maxsize=None)(_symlinks)

    def leaves(file: str) -> bool:
        if os.path.isabs(file):
            return True
        folder, name = os.path.split(file)
        real = real_folder(folder)  # each folder resolved and listed once: a million rows share a few
        path = os.path.join(real, name)
        if name in ("", ".", "..") or name in links(real):
            path = os.path.realpath(path)
        return not path.startswith(real_root + os.sep)

    # Column-wise first: a plain relative path ("a/b.png": no "//", no "."/".." name) in a folder that
    # resolves inside the root, whose name is no symlink there, stays inside. Only the others (few, in
    # a real dataset) go through `leaves` row by row.
    if files.empty:
        return np.zeros(0, dtype=bool)
    # (Plain Python string methods: 4x faster than pandas' .str accessor at 100k rows.)
    paths = files.tolist()
    split = [path.rpartition("/") for path in paths]
    folder, name = np.array([part[0] for part in split], dtype=object), np.array([part[2] for part in split], dtype=object)
    plain = np.array([not (path.startswith("/") or "//" in path or part[2] in ("", ".", "..")) for path, part in zip(paths, split)],
                     dtype=bool)
    slow, plain_rows = ~plain, np.flatnonzero(plain)
    for each_folder, rows in pd.Series(plain_rows).groupby(folder[plain_rows], sort=False).indices.items():
        real, rows = real_folder(each_folder), plain_rows[rows]
        linked = links(real)
        if not (real == real_root or real.startswith(real_root + os.sep)) or isinstance(linked, _Lstat):
            slow[rows] = True
        elif linked:
            slow[rows] = np.isin(name[rows], list(linked))
    result = np.zeros(len(files), dtype=bool)
    result[slow] = [leaves(files.iat[i]) for i in np.flatnonzero(slow)]
    return result


def _symlinks(folder: str) -> frozenset[str] | _Lstat:
    """The names of the symlinks in `folder`, from one directory listing (no stat per file)."""
    try:
        with os.scandir(folder) as entries:
            return frozenset(entry.name for entry in entries if entry.is_symlink())
    except (FileNotFoundError, NotADirectoryError):
        return frozenset()  # nothing in it can be a symlink (os.path.islink would say False)
    except OSError:  # unreadable listing: ask each file
        return _Lstat(folder)


@dataclass(frozen=True)
class _Lstat:
    folder: str

    def __contains__(self, name: str) -> bool:
        return os.path.islink(os.path.join(self.folder, name))


def row_problems(table: pd.DataFrame, data: DictConfig, root: Path, source: str) -> tuple[list[str], np.ndarray]:
    """Every problem with the listing itself (paths, labels, attributes, duplicates), one line each,
    citing the metadata CSV's own line numbers, and which rows have one (never decode those).

    Checks run column-wise (a 100k-row listing takes milliseconds); only flagged rows are visited.
    """
    files, labels = table["file"], table["label"]
    checks = [(files == "", lambda i: "empty file name"),
              ((files != "") & outside_root(files, root), lambda i: f"path leaves the data folder {root} (absolute, '..' or a symlink)"),
              (files.duplicated(keep="first"), lambda i: "file listed twice"),
              (labels == "", lambda i: "missing label"),
              ((labels != "") & ~labels.isin(list(data.classes)), lambda i: f"label {labels.iloc[i]!r} is not in data.classes")]
    for attr in data.sensitive_attributes:
        checks.append((table[attr].isna() | (table[attr] == ""), lambda i, attr=attr: f"missing sensitive attribute {attr!r}"))
    masks = [mask.to_numpy() for mask, _ in checks]
    flagged = np.logical_or.reduce(masks)
    problems = []
    for i in np.flatnonzero(flagged):
        line = table["line"].iloc[i]
        where = f"{source} line {line} ({files.iloc[i] or '<empty file name>'})" if line else str(root / files.iloc[i])
        problems += [f"{where}: {message(i)}" for mask, (_, message) in zip(masks, checks) if mask[i]]
    return problems, flagged


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
