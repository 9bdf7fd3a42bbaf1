"""Interpretable per-image features, shared by prepare (reference statistics), evaluate
(error analysis) and the serving handler (drift monitoring). numpy only, so the TorchServe
archive can ship this file alone."""

from __future__ import annotations

import numpy as np

FEATURES = ("brightness", "contrast", "ink_ratio", "sharpness")


_GRAY_LEVELS = np.arange(256, dtype=np.uint8).astype(np.float32) / 255.0  # _gray of a one-channel uint8 pixel


def _gray(images: np.ndarray) -> np.ndarray:
    if images.shape[1] == 1:  # the mean of one channel is that channel, bit for bit, without the reduction
        return images[:, 0].astype(np.float32) / np.float32(255.0)
    return (images.astype(np.float32) / 255.0).mean(axis=1)


def _median(gray: np.ndarray, images: np.ndarray) -> np.ndarray:
    """np.median(gray, axis=1, keepdims=True) of the flattened gray images, bit for bit. For one-channel
    uint8 images the gray values are 256 known levels: the middle ranks are read from each image's
    histogram of levels (a bincount) instead of partitioning floats, several times faster."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 1 or not gray.size:
        return np.median(gray, axis=1, keepdims=True)
    n, size = gray.shape
    levels = images.reshape(n, size)
    counts = np.bincount((levels + (np.arange(n, dtype=np.intp) * 256)[:, None]).ravel(), minlength=n * 256)
    below = counts.reshape(n, 256).cumsum(axis=1)
    ranks = [size // 2 - 1, size // 2] if size % 2 == 0 else [size // 2]  # the ranks np.median averages
    middle = np.stack([(below <= rank).sum(axis=1) for rank in ranks], axis=1)  # the level at each rank
    return _GRAY_LEVELS[middle].mean(axis=1, keepdims=True)  # np.median's own mean of its middle values


def _intensity(flat: np.ndarray) -> dict[str, np.ndarray]:
    return {"brightness": flat.mean(axis=1), "contrast": flat.std(axis=1)}


def intensity(images: np.ndarray) -> dict[str, np.ndarray]:
    """Brightness and contrast only: cheap enough for every image the server sees."""
    return _intensity(_gray(images).reshape(len(images), -1))


def image_features(images: np.ndarray) -> dict[str, np.ndarray]:
    """Features of a uint8 batch shaped (N, C, H, W); values are in [0, 1]-ish units."""
    gray = _gray(images)
    flat = gray.reshape(len(gray), -1)
    background = _median(flat, images)
    grad_y = np.abs(np.diff(gray, axis=1)).mean(axis=(1, 2))
    grad_x = np.abs(np.diff(gray, axis=2)).mean(axis=(1, 2))
    return {
        **_intensity(flat),
        "ink_ratio": (np.abs(flat - background) > 0.25).mean(axis=1),
        "sharpness": (grad_x + grad_y) / 2,
    }


def feature_table(images: np.ndarray, rows: np.ndarray, chunk: int = 1024) -> dict[str, np.ndarray]:
    """image_features of images[rows] from a large (memory-mapped) array, one small chunk at a time."""
    parts = [image_features(images[rows[i : i + chunk]]) for i in range(0, len(rows), chunk)]
    return {name: np.concatenate([p[name] for p in parts]) if parts else np.empty(0) for name in FEATURES}


def reference_histograms(features: dict[str, np.ndarray], bins: int) -> dict[str, dict[str, list[float]]]:
    """Histogram per feature with open-ended outer bins, so live values always land in a bin."""
    out = {}
    for name, values in features.items():
        lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            hi = lo + 1e-6
        inner = np.linspace(lo, hi, bins + 1)
        counts, _ = np.histogram(values, bins=inner)
        out[name] = {"edges": inner.tolist(), "counts": counts.astype(int).tolist()}
    return out
