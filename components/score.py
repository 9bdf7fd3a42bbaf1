"""score: batch inference with a packaged version, next to online serving.

    python -m components.score                                   # score.input with artifacts/package
    python -m components.score --input s3://bucket/new/ --tag digits#prod#3 --out artifacts/score

Scores every PNG/JPEG below a folder or an s3:// prefix with a package (a folder, or the one a
GTO tag points to, fetched from the DVC remote), one process per core. The preprocessing is the
serving handler's own (same decoding, resizing, normalization), so a file gets the answer
TorchServe would give. Outputs (`out_dir`, complete or not at all):
- predictions.jsonl: one line per image, the prediction log's shape (model_version, prediction,
  confidence, features) plus file and top_k, so the online drift check reads it unchanged;
- rejected.jsonl: files that could not be read or decoded, with the reason (never fatal);
- drift.json / drift.html: components/drift/report.py's check of these predictions against the package's
  reference statistics (serve.drift thresholds), when there are serve.drift.min_samples of them;
- score.json: counts, drift verdict and lineage (package, input content hash, config, code).
"""

from __future__ import annotations

from components.core.cli import run_step, step_command

if __name__ == "__main__":  # before the imports below (onnxruntime, scipy): a bad config is refused at once
    command = step_command("Score a folder or s3:// prefix of images with a packaged model version.",
                           input=None, package="artifacts/package", tag=None, out="artifacts/score")

import hashlib
import json
import os
import tempfile
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from components.core.config.sections import config_hash, select
from components.core.errors import DataError
from components.core.events import emit
from components.core.io import atomic_dir, write_json
from components.core.lifetime import die_with_parent
from components.core.lineage import code_hash, environment
from components.core.paths import ROOT
from components.core.recorded import Recorded, in_repository, locked, verify
from components.core.remote import download_folder
from components.drift.features import image_features
from components.drift.report import DriftError, check_drift
from components.handler.inference import create_session, probabilities, top_k
from components.handler.request import PixelBudget, RequestError, decode_image
from components.registry.tags import fetch_package, model_artifact, read_tag
from components.scoring.inputs import list_files, read_chunks

SECTIONS = ("serve.drift", "serve.max_image_pixels", "score")  # the config this step reads: its DVC params and its config hash
_model: dict = {}  # per worker process: the ONNX session and the signature


def _load_model(model_path: str, signature: dict, max_pixels: int) -> None:
    die_with_parent()  # a killed scorer takes its workers with it
    # One thread per worker process: the pool uses every core.
    _model.update(session=create_session(Path(model_path), threads=1), signature=signature, max_pixels=max_pixels)


def _decoded(paths: list[str], blobs: list, signature: dict) -> tuple[list[int], list[np.ndarray], list[dict]]:
    good, images, rejected = [], [], []
    for i, (path, blob) in enumerate(zip(paths, blobs)):
        try:
            if isinstance(blob, Exception):
                raise ValueError(f"cannot be read ({blob.__class__.__name__}: {blob})")
            images.append(decode_image(blob, signature, PixelBudget(_model["max_pixels"])))
            good.append(i)
        except (ValueError, RequestError) as exc:
            rejected.append({"file": path, "error": str(exc)})
    return good, images, rejected


def score_chunk(paths: list[str], blobs: list, version: str) -> tuple[list[dict], list[dict]]:
    """(prediction records, rejected files) of one chunk, in a worker process."""
    signature, session = _model["signature"], _model["session"]
    good, images, rejected = _decoded(paths, blobs, signature)
    if not images:
        return [], rejected
    pixels = np.stack(images)
    ranked = top_k(probabilities(session, pixels, signature), signature)  # what the handler answers
    features = image_features(pixels)
    records = [{"file": paths[i], "model_version": version, "prediction": ranked[row][0]["label"],
                "confidence": ranked[row][0]["probability"], "top_k": ranked[row],
                "features": {name: round(float(values[row]), 6) for name, values in features.items()}}
               for row, i in enumerate(good)]
    return records, rejected


def _results(pool: Executor, chunks, version: str, depth: int):
    """Chunk results in input order, with at most `depth` chunks read ahead of the workers."""
    pending = deque()
    for paths, blobs in chunks:
        pending.append(pool.submit(score_chunk, paths, blobs, version))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _input_digest(chunks, digest):
    """Pass the chunks through, hashing every file's relative path and bytes (the input's content address)."""
    for paths, blobs in chunks:
        for path, blob in zip(paths, blobs):
            digest.update(path.encode() + b"\0" + (blob if isinstance(blob, bytes) else b"<unreadable>") + b"\0")
        yield paths, blobs


def _relative(chunks, root: str):
    for paths, blobs in chunks:
        yield [path[len(root) + 1 :] for path in paths], blobs


def resolve_package(package_dir: str | Path, tag: str | None, scratch: Path) -> tuple[Path, dict]:
    """The package folder to score with and where it came from: a folder, an s3:// prefix, or a GTO tag
    (the package committed at the tag's commit, fetched from the DVC remote)."""
    if str(package_dir).startswith("s3://"):
        return download_folder(str(package_dir), scratch / "package", "--package"), {"package": str(package_dir)}
    if not tag:
        if not (Path(package_dir) / "package.json").exists():
            raise DataError(f"{package_dir}: no package.json; run the package step, or score a registered version with --tag")
        return Path(package_dir), {"package": str(package_dir)}
    read = read_tag(tag, ROOT)
    return fetch_package(read["commit"], scratch / "package", ROOT), {"tag": tag, "registry_version": read["version"],
                                                                       "commit": read["commit"]}


def model_record(package_dir: Path, source: dict, repo: Path = ROOT) -> Recorded | None:
    """What the pipeline recorded for the package's model.onnx outside its folder: the tag's commit's dvc.lock, or this
    repository's dvc.lock for a package inside it; None for a folder elsewhere or an s3:// prefix (no record to read)."""
    if "tag" in source:
        return locked(repo, f"{model_artifact(repo)[1]}/model.onnx", source["commit"])
    return None if source["package"].startswith("s3://") else in_repository(package_dir / "model.onnx", repo)


def _drift(cfg: DictConfig, out: Path, reference: Path) -> dict:
    try:
        report = check_drift(cfg, out / "predictions.jsonl", reference, out)
    except DriftError as exc:
        return {"checked": False, "reason": str(exc)}
    return {"checked": True, "drift": report["drift"], "samples": report["samples"]}


def _write_records(out: Path, results) -> tuple[int, int]:
    scored = rejected = 0
    with open(out / "predictions.jsonl", "w") as predictions, open(out / "rejected.jsonl", "w") as bad:
        for records, rejects in results:
            predictions.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records)
            bad.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rejects)
            scored, rejected = scored + len(records), rejected + len(rejects)
    return scored, rejected


def predict_files(fs, root: str, files: list[str], package_dir: Path, score_cfg: DictConfig, max_pixels: int,
                  out: Path) -> tuple[int, int, str]:
    """Score `files` into out/predictions.jsonl and out/rejected.jsonl with one process per core (score.workers);
    returns (scored, rejected, content hash of the input)."""
    manifest = json.loads((package_dir / "package.json").read_text())
    signature = json.loads((package_dir / "signature.json").read_text())
    workers = score_cfg.workers or os.cpu_count()
    digest = hashlib.sha256()
    chunks = _relative(_input_digest(read_chunks(fs, files, score_cfg.chunk_size), digest), root)
    with ProcessPoolExecutor(workers, initializer=_load_model, initargs=(str(package_dir / "model.onnx"), signature, max_pixels)) as pool:
        scored, rejected = _write_records(out, _results(pool, chunks, manifest["version"], 2 * workers))
    return scored, rejected, digest.hexdigest()[:16]


def score(cfg: DictConfig, input: str | None = None, package: str | Path = "artifacts/package", tag: str | None = None,
          out: str | Path = "artifacts/score") -> dict:
    """Score every image below `input` (default score.input) with a package; returns score.json's content."""
    events = cfg.events  # a side channel (components/core/events.py): it determines no output, so it is not in SECTIONS
    cfg = select(cfg, SECTIONS)
    uri = input or cfg.score.input
    fs, root, files = list_files(uri, list(cfg.score.extensions))
    with tempfile.TemporaryDirectory() as scratch, atomic_dir(out) as tmp:
        package_dir, source = resolve_package(package, tag, Path(scratch))
        recorded = model_record(package_dir, source)
        if recorded:
            verify(package_dir / "model.onnx", recorded)
        manifest = json.loads((package_dir / "package.json").read_text())
        scored, rejected, input_hash = predict_files(fs, root, files, package_dir, cfg.score, cfg.serve.max_image_pixels, tmp)
        if not scored:
            raise DataError(f"{uri}: none of the {len(files)} files could be scored (not PNG/JPEG, or unreadable)")
        drift = _drift(cfg, tmp, package_dir / "reference_stats.json")
        summary = {"input": uri, "files": len(files), "scored": scored, "rejected": rejected, "drift": drift,
                   "model": {"name": manifest["model_name"], "version": manifest["version"], **source,
                             "verified_against": recorded.where if recorded else "nothing (no record outside the package's folder)"},
                   "lineage": {"package": manifest["lineage"], "input_hash": input_hash, "config_hash": config_hash(cfg),
                               "code_hash": code_hash("components.score"), "environment": environment()}}
        write_json(tmp / "score.json", summary)
    if drift.get("drift"):
        emit(events, "drift_detected", f"batch {uri}: drift in {drift['samples']} predictions of {manifest['model_name']} "
             f"{manifest['version']}", model=manifest["model_name"], version=source.get("registry_version"),
             commit=source.get("commit"), details={"report": str(Path(out) / "drift.json"), "input": uri})
    return summary


def _summary(result: dict, args) -> str:
    drift = result["drift"]
    verdict = ("drift detected" if drift["drift"] else "no drift") if drift["checked"] else f"drift not checked ({drift['reason']})"
    return (f"score: {result['scored']} of {result['files']} files scored with {result['model']['name']} "
            f"{result['model']['version']}, {result['rejected']} rejected; {verdict} -> {args.out}")


if __name__ == "__main__":
    run_step(command, score, _summary)
