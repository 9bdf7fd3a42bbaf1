"""Interpretability: a glass-box EBM (interpret) that learns where the model errs from
interpretable per-image features ("error analysis", on at most `evaluate.error_analysis_max_images`
test images), and captum attributions for a sample of test images (`evaluate.attribution_samples`),
drawn as grids (input | attribution overlay | predicted vs true label). Neither grows without bound
with the test set."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from torch import nn

from components.drift.features import image_features
from components.evaluation.report import figure_png, new_figure

MIN_PER_OUTCOME = 2  # fewer errors (or correct predictions) than this leave nothing to learn from


def error_features(images: np.ndarray, index: pd.DataFrame, attributes: list[str], probs: np.ndarray) -> pd.DataFrame:
    """Per test image: the interpretable image features, sensitive attributes, true label, confidence."""
    table = pd.DataFrame(image_features(images))
    for attr in attributes:
        table[attr] = index[attr].to_numpy()
    table["true_label"] = index["label"].to_numpy()
    table["confidence"] = probs.max(axis=1)
    return table


def stratified_sample(strata: np.ndarray, budget: int, seed: int) -> np.ndarray:
    """`budget` row numbers (sorted), or every row when there are no more: each stratum in
    proportion to its size (within one row), which of its rows by a shuffle seeded by `seed`.
    Systematic sampling over the rows ordered by stratum, then by a seeded random key."""
    n = len(strata)
    if n <= budget:
        return np.arange(n)
    order = np.lexsort((np.random.default_rng(seed).random(n), strata))
    return np.sort(order[np.arange(budget) * n // budget])


def analyse_errors(images: np.ndarray, index: pd.DataFrame, attributes: list[str], probs: np.ndarray, e: DictConfig,
                   seed: int, numerics: str = "reference") -> dict:
    """The error analysis on the test split, or above `e.error_analysis_max_images` test images on a
    seeded sample of that many, stratified by true class and outcome (error or not). Its "n_images"
    are the images analysed, its "n_test" the test split's."""
    y_true = index["label_index"].to_numpy()
    wrong = probs.argmax(axis=1) != y_true
    rows = stratified_sample(2 * y_true + wrong, e.error_analysis_max_images, seed)
    features = error_features(images[rows], index.iloc[rows], attributes, probs[rows])
    return {**error_analysis(features, wrong[rows], e, seed, numerics), "n_test": len(y_true)}


def error_analysis(features: pd.DataFrame, errors: np.ndarray, e: DictConfig, seed: int, numerics: str = "reference") -> dict:
    """Fit an EBM predicting `errors`; rank its terms and describe the strongest in words. Its native
    code picks SIMD kernels by the CPU (AVX-512 vs AVX2 change the report), so the reference
    numerics run its scalar code, the one shown to give the same report on another CPU."""
    n_errors = int(errors.sum())
    summary = {"n_images": len(errors), "n_errors": n_errors, "ranking": [], "findings": [], "term_plots": []}
    if min(n_errors, len(errors) - n_errors) < MIN_PER_OUTCOME:
        summary["findings"] = [f"Not fitted: {n_errors} error(s) in {len(errors)} test images is too few to tell where errors concentrate."]
        return summary
    from interpret import develop
    from interpret.glassbox import ExplainableBoostingClassifier  # imported where used: a second of import time
    from interpret.utils._native import Native

    develop.set_option("acceleration", Native.AccelerationFlags_NONE if numerics == "reference" else Native.AccelerationFlags_ALL)

    # Text columns (true label, sensitive attributes) are categories, even when they read as numbers ("0".."9").
    types = ["continuous" if pd.api.types.is_numeric_dtype(features[c]) else "nominal" for c in features.columns]
    ebm = ExplainableBoostingClassifier(feature_types=types, interactions=e.error_analysis_interactions, random_state=seed)
    ebm.fit(features, errors.astype(int))
    order = np.argsort(-ebm.term_importances(), kind="stable")
    summary["ranking"] = [{"term": ebm.term_names_[i], "importance": float(ebm.term_importances()[i])} for i in order]
    contributions = ebm.eval_terms(features)
    explanation = ebm.explain_global()
    single = [i for i in order if len(ebm.term_features_[i]) == 1]
    summary["findings"] = [describe(ebm.term_names_[i], features, contributions[:, i], errors) for i in single[:3]]
    summary["term_plots"] = [term_plot(ebm.term_names_[i], explanation.data(i), ebm.feature_types_in_[ebm.term_features_[i][0]])
                             for i in single[: e.error_analysis_term_plots]]
    summary["importance_plot"] = importance_plot(summary["ranking"])
    return summary


def describe(term: str, features: pd.DataFrame, contribution: np.ndarray, errors: np.ndarray) -> str:
    """One plain sentence on how a feature relates to errors, from the EBM's per-image contributions."""
    values = features[term]
    if not pd.api.types.is_numeric_dtype(values):
        by_value = pd.Series(contribution).groupby(values.to_numpy()).mean()
        worst = by_value.idxmax()
        rate = errors[values.to_numpy() == worst].mean()
        return (f"{term}: with the other features accounted for, {term} = {worst} makes errors most likely "
                f"(on its own: error rate {rate:.1%} against {errors.mean():.1%} overall).")
    from scipy.stats import spearmanr

    direction = "higher" if spearmanr(values, contribution).statistic > 0 else "lower"
    return (f"{term}: with the other features accounted for, {direction} values make errors more likely "
            f"(on its own: mean {values[errors].mean():.3g} on errors, {values[~errors].mean():.3g} on correct predictions).")


def importance_plot(ranking: list[dict]) -> bytes:
    fig, ax = new_figure(5.5, 0.35 * len(ranking) + 1)
    ax.barh([r["term"] for r in ranking][::-1], [r["importance"] for r in ranking][::-1], color="#4c72b0")
    ax.set_xlabel("mean |contribution| to the log-odds of an error")
    ax.set_title("What drives errors (EBM term importance)")
    return figure_png(fig)


def term_plot(term: str, data: dict, feature_type: str) -> bytes:
    """The EBM shape function of one term: its contribution to the log-odds of an error."""
    fig, ax = new_figure(5.5, 3)
    scores, low, high = (np.asarray(data[k]) for k in ("scores", "lower_bounds", "upper_bounds"))
    if feature_type == "continuous":
        edges = np.asarray(data["names"], dtype=float)
        ax.stairs(scores, edges, color="#4c72b0", linewidth=1.5)
        ax.stairs(high, edges, baseline=low, fill=True, alpha=0.25, color="#4c72b0")
    else:
        names = [str(n) for n in data["names"]]
        ax.bar(names, scores, yerr=[scores - low, high - scores], color="#4c72b0", capsize=3)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel(term)
    ax.set_ylabel("log-odds of an error")
    ax.set_title(f"EBM term: {term}")
    return figure_png(fig)


def attribution_sample(probs: np.ndarray, y_true: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to n//2 most confident mistakes, and a seeded random sample of the rest up to n in all."""
    confidence, y_pred = probs.max(axis=1), probs.argmax(axis=1)
    mistakes = np.flatnonzero(y_pred != y_true)
    mistakes = mistakes[np.argsort(-confidence[mistakes], kind="stable")][: n // 2]
    others = np.setdiff1d(np.arange(len(y_true)), mistakes)
    sample = np.random.default_rng(seed).choice(others, size=min(n - len(mistakes), len(others)), replace=False)
    return mistakes, np.sort(sample)


def attribute(model: nn.Module, norm: nn.Module, images: np.ndarray, targets: np.ndarray, e: DictConfig,
              device: torch.device) -> np.ndarray:
    """Attribution of the target class to each pixel, summed over channels: (N, H, W)."""
    from captum.attr import IntegratedGradients, Occlusion  # imported where used: most of a second

    forward = nn.Sequential(norm, model).to(device).eval()
    x = torch.from_numpy(images).float().to(device)
    target = torch.from_numpy(targets).to(device)
    if e.attribution_method == "integrated_gradients":
        # A black image is the "no signal" reference: attributions say what the ink adds.
        result = IntegratedGradients(forward).attribute(x, baselines=torch.zeros_like(x), target=target,
                                                        n_steps=e.attribution_steps, internal_batch_size=256)
    else:
        w, channels = e.occlusion_window, x.shape[1]
        result = Occlusion(forward).attribute(x, sliding_window_shapes=(channels, w, w), target=target,
                                              strides=(channels, max(1, w // 2), max(1, w // 2)), baselines=0)
    return result.sum(dim=1).detach().cpu().numpy()


def attribution_grid(images: np.ndarray, attributions: np.ndarray, captions: list[str], mistakes: np.ndarray) -> bytes:
    """One row per image: input | attribution overlay | predicted vs true label."""
    fig, axes = new_figure(6, 1.6 * len(images), nrows=len(images), ncols=3, squeeze=False)
    for row, (image, attr, caption, wrong) in enumerate(zip(images, attributions, captions, mistakes)):
        shown = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        limit = float(np.abs(attr).max()) or 1.0
        axes[row, 0].imshow(shown, cmap="gray", vmin=0, vmax=255)
        axes[row, 1].imshow(shown if image.shape[0] == 1 else shown.mean(axis=2), cmap="gray", vmin=0, vmax=255)
        axes[row, 1].imshow(attr, cmap="bwr", vmin=-limit, vmax=limit, alpha=0.6)
        axes[row, 2].text(0.02, 0.5, caption, va="center", fontsize=9, color="#b00020" if wrong else "#1b5e20")
        for ax in axes[row]:
            ax.set_axis_off()
    axes[0, 0].set_title("input", fontsize=9)
    axes[0, 1].set_title("attribution (red +, blue -)", fontsize=9)
    axes[0, 2].set_title("predicted vs true", fontsize=9)
    return figure_png(fig)


def attribution_grids(model: nn.Module, norm: nn.Module, images: np.ndarray, index: pd.DataFrame, probs: np.ndarray,
                      attributes: list[str], classes: list[str], e: DictConfig, device: torch.device, seed: int) -> dict[str, bytes]:
    """Grids of the most confident mistakes and of a random sample, keyed by their title."""
    y_true, y_pred = index["label_index"].to_numpy(), probs.argmax(axis=1)
    grids = {}
    for title, rows in zip(("Most confident mistakes", "Random sample"), attribution_sample(probs, y_true, e.attribution_samples, seed)):
        if len(rows) == 0:
            continue
        attributions = attribute(model, norm, images[rows], y_pred[rows], e, device)
        captions = [f"predicted {classes[y_pred[i]]} ({probs[i].max():.2f})\ntrue {classes[y_true[i]]}\n"
                    + ", ".join(f"{a}={index.at[i, a]}" for a in attributes) for i in rows]
        grids[title] = attribution_grid(images[rows], attributions, captions, y_pred[rows] != y_true[rows])
    return grids
