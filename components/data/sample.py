"""The bundled example dataset, and `ensure_data`, which makes data/ appear on a fresh clone.

The images are real: scikit-learn's bundled handwritten digits (1,797 8x8 scans), upscaled
to 32x32 PNG. The sensitive attribute `site` is simulated: a seeded 30% of the images are
assigned to a second scanning site whose scans have lower contrast and more noise.
Generation is deterministic, so the bytes match the hash pinned in data.dvc.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from components.core.errors import DataError, run_cli
from components.core.io import atomic_dir
from components.core.lineage import data_hash
from components.core.paths import ROOT
from components.data.source import dvc_dir_hash

# These constants define the shipped example (and so the hash in data.dvc); they are not
# experiment parameters.
SEED = 20240601
SIZE = 32
LOW_CONTRAST_SITE = "site_b"
LOW_CONTRAST_FRACTION = 0.3
LOW_CONTRAST_GAIN = 0.45
LOW_CONTRAST_OFFSET = 70.0
NOISE_STD = 18.0


def generate(out_dir: str | os.PathLike) -> Path:
    """Write images/*.png and metadata.csv (file,label,site) to `out_dir`, atomically."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(SEED)
    low_site = rng.random(len(digits.images)) < LOW_CONTRAST_FRACTION
    rows = ["file,label,site"]
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        for i, (img, label) in enumerate(zip(digits.images, digits.target)):
            scan = Image.fromarray((img * (255 / 16)).astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR)
            pixels = np.asarray(scan, dtype=np.float64)
            site = "site_a"
            if low_site[i]:
                site = LOW_CONTRAST_SITE
                pixels = pixels * LOW_CONTRAST_GAIN + LOW_CONTRAST_OFFSET + rng.normal(0, NOISE_STD, pixels.shape)
            name = f"images/{i:05d}.png"
            buf = io.BytesIO()
            Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).save(buf, format="PNG")
            (tmp / name).write_bytes(buf.getvalue())
            rows.append(f"{name},{label},{site}")
        (tmp / "metadata.csv").write_text("\n".join(rows) + "\n")
    return Path(out_dir)


def _dvc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ROOT, capture_output=True, text=True)


def remote_configured() -> bool:
    """True when the user gave S3 credentials/endpoint; without them we never touch the network."""
    return (ROOT / ".dvc" / "config.local").exists() or "AWS_ACCESS_KEY_ID" in os.environ


def ensure_data(data_dir: Path = ROOT / "data") -> str:
    """Make data/ match data.dvc: keep it, pull it from the remote, or regenerate and verify it."""
    if (data_dir / "metadata.csv").exists() or (data_dir.exists() and any(data_dir.iterdir())):
        return "present"
    if remote_configured():
        if _dvc("pull", "data.dvc").returncode == 0:
            return "pulled from the DVC remote"
        print("warning: `dvc pull data.dvc` failed; regenerating the sample data instead")
    generate(data_dir)
    if dvc_dir_hash(data_dir) != data_hash():
        shutil.rmtree(data_dir)
        raise DataError(
            f"{data_dir} was regenerated but its hash does not match data.dvc; "
            "data.dvc points at other data: configure the remote and run `dvc pull`"
        )
    _dvc("commit", "--force", "data.dvc")  # put the verified files in the DVC cache, ready to push
    return "regenerated from scikit-learn's digits; hash matches data.dvc"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ensure", help="make data/ match data.dvc (pull or regenerate + verify)")
    gen = sub.add_parser("generate", help="write the sample dataset to a folder")
    gen.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    if args.command == "generate":
        run_cli(lambda: print(f"wrote {generate(args.out_dir)}"))
    else:
        run_cli(lambda: print(f"data/: {ensure_data()}"))
