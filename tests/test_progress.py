"""Progress wherever the output goes: log lines (count, rate, ETA, the step's numbers) when stderr
is a pipe, as in CI, KFP pod logs or `| tee`; a tqdm bar when it is a terminal (a real pty)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from components.core.paths import ROOT
from tests.helpers.project import run

TINY = ["data.classes=[a,b,c]", "data.image_size=[16,16]", "train.epochs=2", "train.batch_size=8"]


def steps(data: Path, work: Path) -> list[list[str]]:
    overrides = [f"data.root={data}", *TINY, f"events.log_file={work / 'events.jsonl'}"]
    return [[sys.executable, "-m", "components.prepare", "--data", str(data), "--out", str(work / "prepared"), *overrides],
            [sys.executable, "-m", "components.train", "--prepared", str(work / "prepared"), "--out", str(work / "model"),
             "--live", str(work / "live"), "--checkpoints", str(work / "ckpt"), *overrides]]


@pytest.mark.integration
def test_piped_output_gets_one_line_per_epoch_and_periodic_lines(tiny_dataset, tmp_path):
    prepare, train = (run(cmd, ROOT) for cmd in steps(tiny_dataset, tmp_path))
    assert re.search(r"^prepare: decoding: img 36/36 \(100%\) \| .* img/s, elapsed \d+s, ETA 0s$", prepare.stderr, re.M)
    epochs = re.findall(r"^train: epoch (\d)/2 \(\d+%\) train_loss=\S+ val_loss=\S+ val_accuracy=\S+ images_per_s=\d+ \| "
                        r".* epoch/s, elapsed \d+s, ETA \d+s$", train.stderr, re.M)
    assert epochs == ["1", "2"], train.stderr
    assert "\r" not in prepare.stderr + train.stderr  # no bar redraws in a log


@pytest.mark.integration
def test_a_terminal_gets_a_bar_instead(tiny_dataset, tmp_path):
    prepare_cmd, _ = steps(tiny_dataset, tmp_path)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.Popen(prepare_cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait() == 0
    shown = b"".join(chunks).decode(errors="replace")
    assert "\r" in shown and "36/36" in shown and "ETA" not in shown
