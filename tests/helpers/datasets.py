"""Small hand-made image datasets and the config that fits them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from components.core.config.compose import compose


def make_image_dataset(root: Path, classes=("a", "b", "c"), per_class: int = 12, channels: int = 1,
                       size: tuple[int, int] = (20, 24), fmt: str = "csv", attribute: str = "site") -> Path:
    """Each class is a bright bar at its own position; the attribute alternates g0/g1."""
    rng = np.random.default_rng(0)
    rows = ["file,label," + attribute]
    for k, label in enumerate(classes):
        for i in range(per_class):
            pixels = rng.integers(0, 40, size=(*size, channels) if channels == 3 else size).astype(np.uint8)
            band = slice(k * size[0] // len(classes), (k + 1) * size[0] // len(classes))
            pixels[band] = 220
            name = f"{label}/{i:03d}.png" if fmt == "imagefolder" else f"img_{label}_{i:03d}.png"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / name)
            rows.append(f"{name},{label},g{i % 2}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def small_overrides(data_root: Path, *overrides: str, classes=("a", "b", "c"), channels: int = 1) -> list[str]:
    """Hydra overrides that fit make_image_dataset's output (usable on any step's command line)."""
    return [f"data.root={data_root}", f"data.classes=[{','.join(classes)}]", f"data.channels={channels}",
            "data.image_size=[16,16]", "train.epochs=2", "train.batch_size=8", *overrides]


def small_config(data_root: Path, *overrides: str, classes=("a", "b", "c"), channels: int = 1):
    return compose(small_overrides(data_root, *overrides, classes=classes, channels=channels))
