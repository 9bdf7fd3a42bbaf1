"""Cost of the evaluate step on the sample, how each of its parts grows with the test set, and
how its two configurable costs grow: attributions with the number of explained images (and
integrated-gradients steps), the bootstrap with the number of draws and of test images. Each is
timed beside a baseline and printed as a ratio.

    python -m bench.evaluate_bench [--repeats 3] [--parts imports step scale attributions bootstrap] [numerics.threads=1]

`scale` times each part of the step (predict, quality bootstrap, fairness, error analysis,
attributions, writing the reports) at 100, 1,000 and 10,000 test images, min/median/max over
--repeats; the test sets are the sample's test images drawn with replacement, each with its own
seeded pixel noise, so the model makes errors as on real data.

Needs artifacts/prepared and artifacts/model (`make run` or `dvc repro train` first).
Target: the whole step (`python -m components.evaluate`, imports included) <= 30 s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from captum.attr import Saliency
from fairlearn.metrics import MetricFrame
from omegaconf import OmegaConf
from sklearn.metrics import accuracy_score
from torch import nn

import components  # noqa: F401  (first: it pins the reference numerics before torch loads)
from components.core.config.compose import compose
from components.core.numerics import activate
from components.core.paths import ROOT
from components.data.dataset import load_prepared
from components.evaluate import evaluate, headline, write_reports
from components.evaluation.explanations import analyse_errors, attribute, attribution_grids
from components.evaluation.fairness import accuracy_gap_interval, fairness_report
from components.evaluation.gates import decide, verdict_counts
from components.evaluation.quality import measured_checks, quality_metrics
from components.evaluation.report import Evaluation
from components.model.networks import load_trained, predict_logits

PREPARED, MODEL = ROOT / "artifacts/prepared", ROOT / "artifacts/model"
CPU = torch.device("cpu")
BASELINE_REV = "9250a73"  # the code before the steps imported heavy libraries only where used


def timings(repeats: int, *fns) -> list[list[float]]:
    """Seconds of each of `repeats` runs of each function, the functions taking turns so that a
    burst of load from other processes on the machine hits them alike."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return times


def side_by_side(repeats: int, *fns) -> list[float]:
    """Fastest of `repeats` runs of each function, in turns."""
    return [min(spent) for spent in timings(repeats, *fns)]


def best_of(repeats: int, fn) -> float:
    return side_by_side(repeats, fn)[0]


def whole_step(repeats: int, overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cli = [sys.executable, "-m", "components.evaluate", "--prepared", str(PREPARED), "--model", str(MODEL), "--reports", f"{tmp}/cli"]
        step, imports = side_by_side(repeats, lambda: subprocess.run(cli, cwd=ROOT, check=True, capture_output=True),
                                     lambda: subprocess.run([sys.executable, "-c", "import components.evaluate"], cwd=ROOT, check=True))
        cfg = compose(overrides)
        in_process = best_of(repeats, lambda: evaluate(cfg, PREPARED, MODEL, f"{tmp}/lib"))
    model, norm, _ = load_trained(MODEL)
    images = torch.from_numpy(load_prepared(PREPARED).split("test")[0])
    predict = best_of(repeats, lambda: predict_logits(model, norm, images, CPU))
    print(f"\n== whole evaluate step on the sample ({len(images)} test images, default config) ==")
    print(f"python -m components.evaluate (what DVC runs): {step:6.2f} s   (target <= 30 s)")
    print(f"  of which importing the libraries:           {imports:6.2f} s")
    print(f"evaluate() in process:                         {in_process:6.2f} s")
    print(f"baseline, predicting the test split only:      {predict:6.3f} s   ratio step/predict {in_process / predict:6.0f}x")


def step_imports(repeats: int, overrides: list[str], baseline_rev: str = BASELINE_REV) -> None:
    """Import time of each step module, this tree vs `baseline_rev` (from `git archive`), alternating."""
    print(f"\n== importing a step: this tree vs {baseline_rev} (min of {repeats}) ==")
    with tempfile.TemporaryDirectory() as baseline:
        subprocess.run(f"git archive {baseline_rev} components serve | tar -x -C {baseline}", shell=True, cwd=ROOT, check=True)
        for step in ("prepare", "train", "evaluate", "package"):
            def importing(tree: str) -> None:
                subprocess.run([sys.executable, "-c", f"import components.{step}"], cwd=tree, check=True,
                               env={**os.environ, "PYTHONPATH": tree})
            now, before = side_by_side(repeats, lambda: importing(str(ROOT)), lambda: importing(baseline))
            print(f"  components.{step:<9} {now:6.2f} s   before {before:6.2f} s   ratio {now / before:5.2f}")


SIZES = (100, 1_000, 10_000)


def synthetic_test_set(test: np.ndarray, index: pd.DataFrame, n: int, seed: int) -> tuple[np.ndarray, pd.DataFrame]:
    """n of the sample's test images drawn with replacement, each with its own pixel noise (+-16), with their rows."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(test), n)
    noisy = test[picks].astype(np.int16) + rng.integers(-16, 17, size=(n, *test.shape[1:]), dtype=np.int16)
    return np.clip(noisy, 0, 255).astype(np.uint8), index.iloc[picks].reset_index(drop=True)


def scale(repeats: int, overrides: list[str]) -> None:
    """Each part of the step, as components/evaluate.py runs it, on synthetic test sets of SIZES images."""
    cfg = compose(overrides)
    e, seed, profile, policy = cfg.evaluate, cfg.seed, cfg.numerics.profile, cfg.gate.fairness
    whole = compose([*overrides, f"evaluate.error_analysis_max_images={max(SIZES)}"]).evaluate  # the baseline: no budget
    bounded, baseline = f"error analysis (<= {e.error_analysis_max_images} images)", "  baseline: on the whole test set"
    activate(cfg.numerics.profile, cfg.numerics.threads)
    model, norm, spec = load_trained(MODEL)
    prepared = load_prepared(PREPARED)
    attributes, classes = list(prepared.meta["sensitive_attributes"]), spec["classes"]
    rows: dict[str, list[list[float]]] = {}
    fitted: list[str] = []
    for n in SIZES:
        images, index = synthetic_test_set(*prepared.split("test"), n, seed)
        probs = torch.softmax(predict_logits(model, norm, torch.from_numpy(images), CPU), dim=1).numpy()
        y_true, y_pred = index["label_index"].to_numpy(), probs.argmax(axis=1)
        quality, reliability = quality_metrics(y_true, probs, classes, e.calibration_bins)
        fairness = fairness_report(y_true, y_pred, index[attributes], classes, e, policy, seed)
        decision = decide(measured_checks(quality, y_true, probs, e, seed), fairness["checks"], cfg.gate)
        quality |= {"checks": decision["quality"], "verdicts": verdict_counts(decision["quality"])}
        fairness["gate"] = decision
        errors = analyse_errors(images, index, attributes, probs, e, seed, profile)
        grids = attribution_grids(model, norm, images, index, probs, attributes, classes, e, CPU, seed)
        ev = Evaluation(spec, prepared.meta, OmegaConf.to_container(cfg, resolve=True), quality, reliability,
                        fairness, errors, grids, {"data_hash": f"synthetic, {n} test images"})
        with tempfile.TemporaryDirectory() as out:
            parts = {
                "predict": lambda: predict_logits(model, norm, torch.from_numpy(images), CPU),
                f"quality bootstrap ({e.bootstrap_samples} draws)": lambda: measured_checks(quality, y_true, probs, e, seed),
                "fairness (checks, bootstrap)": lambda: fairness_report(y_true, y_pred, index[attributes], classes, e, policy, seed),
                bounded: lambda: analyse_errors(images, index, attributes, probs, e, seed, profile),
                baseline: lambda: analyse_errors(images, index, attributes, probs, whole, seed, profile),
                f"attributions ({e.attribution_samples} images)":
                    lambda: attribution_grids(model, norm, images, index, probs, attributes, classes, e, CPU, seed),
                "reports (JSON, HTML, card)":
                    lambda: write_reports(ev, headline(quality, fairness, decision["open"]), classes, y_true, y_pred, Path(out)),
            }
            for name, spent in zip(parts, timings(repeats, *parts.values())):
                rows.setdefault(name, []).append(spent)
        fitted.append(f"{errors['n_images']} of {n}, {errors['n_errors']} err")
    print(f"\n== each part of evaluate vs test-set size (s, min/median/max of {repeats}; synthetic test sets) ==")
    print(f"{'part':<34}" + "".join(f"{f'{n:,} images':>22}" for n in SIZES) + f"{'x 1k->10k':>11}")
    for name, cells in rows.items():
        growth = statistics.median(cells[-1]) / statistics.median(cells[-2])
        print(f"{name:<34}" + "".join(f"{spread(cell):>22}" for cell in cells) + f"{growth:>10.1f}x")
    print(f"{'error analysis: images, errors':<34}" + "".join(f"{cell:>22}" for cell in fitted))
    ratio = statistics.median(rows[bounded][-1]) / statistics.median(rows[baseline][-1])
    print(f"error analysis at {max(SIZES):,} images: bounded / whole test set (medians) {ratio:.2f}")


def spread(times: list[float]) -> str:
    return "/".join(f"{t:.2f}" for t in (min(times), statistics.median(times), max(times)))


def attributions(repeats: int, overrides: list[str]) -> None:
    model, norm, _ = load_trained(MODEL)
    test = load_prepared(PREPARED).split("test")[0]
    forward = nn.Sequential(norm, model).eval()
    ig, occlusion = compose(overrides).evaluate, compose([*overrides, "evaluate.attribution_method=occlusion"]).evaluate
    print(f"\n== attributions: cost vs explained images (IG {ig.attribution_steps} steps, "
          f"occlusion window {occlusion.occlusion_window}) ==")
    print("baseline: one plain gradient per image (captum Saliency)")
    print(f"{'images':>6} {'saliency s':>11} {'IG s':>8} {'occl. s':>8} {'IG/sal':>7} {'occl/sal':>8} "
          f"{'IG ms/img':>10} {'IG vs 4 img':>12}")
    first = None
    for n in (4, 16, 64):
        images, targets = test[:n], np.zeros(n, dtype=int)
        x = torch.from_numpy(images).float().requires_grad_()
        saliency, t_ig, t_occ = side_by_side(repeats, lambda: Saliency(forward).attribute(x, target=torch.from_numpy(targets)),
                                             lambda: attribute(model, norm, images, targets, ig, CPU),
                                             lambda: attribute(model, norm, images, targets, occlusion, CPU))
        first = first or t_ig
        print(f"{n:>6} {saliency:>11.4f} {t_ig:>8.3f} {t_occ:>8.3f} {t_ig / saliency:>7.0f} {t_occ / saliency:>8.0f} "
              f"{1000 * t_ig / n:>10.1f} {t_ig / first:>11.1f}x")
    print("IG cost vs steps (16 images):")
    base = None
    for steps in (8, 32, 128):
        e = compose([*overrides, f"evaluate.attribution_steps={steps}"]).evaluate
        t = best_of(repeats, lambda: attribute(model, norm, test[:16], np.zeros(16, dtype=int), e, CPU))
        base = base or t
        print(f"  steps {steps:>4}: {t:6.3f} s  ({t / base:4.1f}x steps=8)")


def naive_bootstrap(correct: np.ndarray, groups: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    """Baseline: resample every group's test images with replacement, draw by draw."""
    members = [correct[groups == g] for g in np.unique(groups)]
    draws = np.array([[rng.choice(m, len(m)).mean() for m in members] for _ in range(samples)])
    return draws[:, 0] - draws[:, 1]


def bootstrap(repeats: int, overrides: list[str]) -> None:
    prepared = load_prepared(PREPARED)
    test, index = prepared.split("test")
    model, norm, _ = load_trained(MODEL)
    correct = predict_logits(model, norm, torch.from_numpy(test), CPU).argmax(1).numpy() == index["label_index"].to_numpy()
    groups = index["site"].to_numpy()
    rng = np.random.default_rng(0)
    print(f"\n== bootstrap of the accuracy gap: cost vs draws ({len(correct)} test images, 2 groups) ==")
    print("baselines: resampling the images draw by draw; fairlearn MetricFrame(n_boot=...)")
    print(f"{'draws':>7} {'ours s':>9} {'resample s':>11} {'fairlearn s':>12} {'resample/ours':>14} {'ours vs 100':>12}")
    first = None
    for samples in (100, 1000, 10000, 100000):
        ours = best_of(10 * repeats, lambda: accuracy_gap_interval(correct, pd.Series(groups), samples, 0.95, 0))
        naive = best_of(1, lambda: naive_bootstrap(correct, groups, samples, rng)) if samples <= 10000 else float("nan")
        fair = best_of(1, lambda: MetricFrame(metrics=accuracy_score, y_true=correct, y_pred=np.ones_like(correct),
                                              sensitive_features=groups, n_boot=samples, ci_quantiles=[0.025, 0.975],
                                              random_state=0)) if samples <= 1000 else float("nan")
        first = first or ours
        print(f"{samples:>7} {ours:>9.5f} {naive:>11.3f} {fair:>12.3f} {naive / ours:>13.0f}x {ours / first:>11.1f}x"
              .replace("nanx", "   -").replace("nan", "  -"))  # the slow baselines are skipped at large draw counts
    print("cost vs test images (1000 draws; the test outcomes repeated k times):")
    for k in (1, 10, 100):
        big_correct, big_groups = np.tile(correct, k), pd.Series(np.tile(groups, k))
        ours = best_of(10 * repeats, lambda: accuracy_gap_interval(big_correct, big_groups, 1000, 0.95, 0))
        naive = best_of(1, lambda: naive_bootstrap(big_correct, big_groups.to_numpy(), 1000, rng))
        print(f"  {len(big_correct):>7} images: ours {ours:8.5f} s, resampling {naive:7.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, as for every command (e.g. evaluate.bootstrap_samples=500)")
    args = parser.parse_args()
    if set(args.parts) - {"imports"} and not (MODEL / "model.safetensors").exists():
        sys.exit("needs artifacts/model: run `make run` (or `dvc repro train`) first")
    print(f"torch threads: {compose(args.overrides).numerics.threads} (numerics.threads; the reference profile's, as the step runs)")
    for part in args.parts:
        PARTS[part](args.repeats, args.overrides)


PARTS = {"imports": step_imports, "step": whole_step, "scale": scale, "attributions": attributions, "bootstrap": bootstrap}


if __name__ == "__main__":
    main()
