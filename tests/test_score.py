"""Batch scoring (components/score.py): a folder or an s3:// prefix (real SeaweedFS) scored with a
real package, bad files skipped and reported, the online drift check on its output, the same
step as a kfp.local pipeline. By tag and as a DVC stage: tests/test_registry.py (it has the git
repo, tags and DVC remote)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from kfp import compiler
from PIL import Image

from components.core.config.compose import compose
from components.core.errors import DataError
from components.core.paths import ROOT
from components.drift.features import FEATURES
from components.handler.handler import OnnxImageClassifier
from components.handler.settings import ERROR_INTERVAL_ENV, MAX_INSTANCES_ENV, MAX_PIXELS_ENV
from components.score import score
from pipelines.in_pod import IMAGE_COMMIT_ENV
from pipelines.local import run_pipeline
from pipelines.score import score_pipeline
from tests.helpers.project import run
from tests.helpers.servers import seaweed_s3

PREDICTION_LOG_KEYS = {"model_version", "prediction", "confidence", "features"}  # components/handler/handler.py's log lines


@pytest.fixture
def package_dir(packaged) -> Path:
    return packaged["out"]


@pytest.fixture
def samples_with_bad_files(package_dir, tmp_path) -> tuple[Path, dict[str, str]]:
    """The package's sample images (labels known) in nested folders, plus files that cannot be scored."""
    folder = tmp_path / "batch"
    expected = {}
    for i, sample in enumerate(json.loads((package_dir / "package.json").read_text())["samples"]):
        name = f"part{i % 2}/{Path(sample['file']).name}"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(package_dir / sample["file"], folder / name)
        expected[name] = sample["expected"]
    (folder / "part0" / "not_an_image.png").write_bytes(b"hello")
    whole = (folder / next(iter(expected))).read_bytes()
    (folder / "part1" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not listed in score.extensions: ignored")
    return folder, expected


def cfg_for(tmp_path: Path, *overrides: str):
    return compose([f"events.log_file={tmp_path / 'events.jsonl'}", "score.chunk_size=4", *overrides])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.integration
def test_a_folder_is_scored_like_the_package_predicts_and_bad_files_are_skipped(package_dir, samples_with_bad_files, tmp_path):
    folder, expected = samples_with_bad_files
    out = tmp_path / "out"
    summary = score(cfg_for(tmp_path, "score.workers=2"), str(folder), package_dir, out=out)

    predictions = read_jsonl(out / "predictions.jsonl")
    assert {p["file"]: p["prediction"] for p in predictions} == expected
    assert all(PREDICTION_LOG_KEYS <= p.keys() and set(p["features"]) == set(FEATURES) for p in predictions)
    assert all(p["top_k"][0] == {"label": p["prediction"], "probability": p["confidence"]} for p in predictions)
    rejected = {r["file"]: r["error"] for r in read_jsonl(out / "rejected.jsonl")}
    assert rejected.keys() == {"part0/not_an_image.png", "part1/truncated.png", "empty.jpg"}
    assert rejected["part0/not_an_image.png"].startswith("not a PNG or JPEG image")
    assert rejected["part1/truncated.png"].startswith("truncated or corrupt image")

    manifest = json.loads((package_dir / "package.json").read_text())
    assert (summary["files"], summary["scored"], summary["rejected"]) == (len(expected) + 3, len(expected), 3)
    assert summary["model"] == {"name": manifest["model_name"], "version": manifest["version"], "package": str(package_dir),
                                "verified_against": "nothing (no record outside the package's folder)"}  # a folder outside the repo
    assert summary["lineage"]["package"] == manifest["lineage"]
    assert summary["drift"]["checked"] is False and "serve.drift.min_samples" in summary["drift"]["reason"]
    assert json.loads((out / "score.json").read_text()) == summary

    again = score(cfg_for(tmp_path, "score.workers=1", "score.chunk_size=1"), str(folder), package_dir, out=tmp_path / "again")
    assert (tmp_path / "again" / "predictions.jsonl").read_bytes() == (out / "predictions.jsonl").read_bytes()
    assert again["lineage"]["input_hash"] == summary["lineage"]["input_hash"]


def test_a_folder_is_scored_in_process_with_a_small_package(tiny_package, tmp_path):
    """The fast tier's batch scoring: the package's samples scored as it predicts them, a broken file rejected."""
    folder = tmp_path / "batch"
    folder.mkdir()
    samples = tiny_package["manifest"]["samples"]
    for sample in samples:
        shutil.copy(tiny_package["out"] / sample["file"], folder / Path(sample["file"]).name)
    (folder / "broken.png").write_bytes(b"hello")
    summary = score(cfg_for(tmp_path, "score.workers=1"), str(folder), tiny_package["out"], out=tmp_path / "out")
    assert (summary["files"], summary["scored"], summary["rejected"]) == (len(samples) + 1, len(samples), 1)
    predictions = {p["file"]: p["prediction"] for p in read_jsonl(tmp_path / "out" / "predictions.jsonl")}
    assert predictions == {Path(sample["file"]).name: sample["expected"] for sample in samples}
    assert [r["file"] for r in read_jsonl(tmp_path / "out" / "rejected.jsonl")] == ["broken.png"]


class FakeTorchServeContext:
    """What the handler reads and sets of TorchServe's Context, for the handler's code path in-process."""

    class Metrics:
        def add_metric_to_cache(self, name: str, unit: str, dimensions: list[str]):
            return self

        def add_or_update(self, value: float, dimension_values: list[str]) -> None:
            pass

    def __init__(self, package_dir: Path, manifest: dict):
        self.system_properties = {"model_dir": str(package_dir)}
        self.model_name, self.manifest = manifest["model_name"], {"model": {"modelVersion": manifest["version"]}}
        self.metrics, self.statuses = self.Metrics(), {}

    def get_all_request_header(self, idx: int) -> dict:
        return {"Content-Type": "image/png"}

    def set_response_content_type(self, idx: int, value: str) -> None:
        pass

    def set_response_status(self, status: int, message: str, idx: int) -> None:
        self.statuses[idx] = status


def test_batch_and_online_answers_are_identical_for_the_same_images_with_a_fake_torchserve_context(tiny_package, tmp_path,
                                                                                                     monkeypatch):
    """Batch scoring and the handler (its initialize/handle, in-process) answer every image alike, to the last digit."""
    images = sorted(tiny_package["raw"].glob("*.png"))  # 20x24: both resize to the model's 16x16
    summary = score(cfg_for(tmp_path, "score.workers=1"), str(tiny_package["raw"]), tiny_package["out"], out=tmp_path / "out")
    batch = {p["file"]: p["top_k"] for p in read_jsonl(tmp_path / "out" / "predictions.jsonl")}

    monkeypatch.setenv(MAX_PIXELS_ENV, str(compose([]).serve.max_image_pixels))
    monkeypatch.setenv(MAX_INSTANCES_ENV, str(compose([]).serve.max_instances))
    monkeypatch.setenv(ERROR_INTERVAL_ENV, str(compose([]).serve.error_report_interval_s))
    handler, context = OnnxImageClassifier(), FakeTorchServeContext(tiny_package["out"], tiny_package["manifest"])
    handler.initialize(context)
    online = [json.loads(answer) for answer in handler.handle([{"body": image.read_bytes()} for image in images], context)]
    assert summary["scored"] == len(images) > 30 and context.statuses == {}
    assert online == [batch[image.name] for image in images]
    assert len({answer[0]["label"] for answer in online}) > 1


def inverted_copies(count: int, folder: Path) -> Path:
    """`count` images of the sample data with black and white swapped: a shifted population."""
    folder.mkdir(parents=True)
    for path in sorted((ROOT / "data" / "images").glob("*.png"))[:count]:
        Image.fromarray(255 - np.asarray(Image.open(path).convert("L"))).save(folder / path.name)
    return folder


@pytest.mark.integration
def test_a_shifted_batch_feeds_the_online_drift_check_and_emits_an_event(package_dir, tmp_path):
    batch = inverted_copies(120, tmp_path / "inverted")
    out = tmp_path / "out"
    summary = score(cfg_for(tmp_path, "serve.drift.min_samples=100"), str(batch), package_dir, out=out)
    assert summary["drift"] == {"checked": True, "drift": True, "samples": 120}
    assert json.loads((out / "drift.json").read_text())["drift"] is True and (out / "drift.html").exists()
    event = read_jsonl(tmp_path / "events.jsonl")[-1]
    assert (event["type"], event["details"]["input"]) == ("drift_detected", str(batch))

    # The online command reads the batch's predictions unchanged: same shape as the prediction log.
    online = run(["python", "-m", "serve", "drift", "--log", str(out / "predictions.jsonl"), "--package", str(package_dir),
                  "--out", str(tmp_path / "online"), "serve.drift.min_samples=100", f"events.log_file={tmp_path / 'online.jsonl'}"],
                 ROOT, check=False)
    assert online.returncode == 1 and "drift detected in the last 120 logged predictions" in online.stdout


def _upload(s3, monkeypatch, folder: Path, package_dir: Path) -> tuple[str, str]:
    """The images and the package put on the S3 server, whose credentials the environment then carries
    (on a cluster: the Kubernetes secret mapped to env); their s3:// URIs."""
    import s3fs

    for name, value in s3.client_env().items():
        monkeypatch.setenv(name, value)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.put(str(folder) + "/", f"{s3.bucket}/incoming/", recursive=True)
    fs.put(str(package_dir) + "/", f"{s3.bucket}/packages/v1/", recursive=True)
    return f"s3://{s3.bucket}/incoming", f"s3://{s3.bucket}/packages/v1"


@pytest.mark.integration
def test_an_s3_prefix_is_scored_with_a_package_from_s3(package_dir, samples_with_bad_files, tmp_path, monkeypatch):
    folder, expected = samples_with_bad_files
    with seaweed_s3(tmp_path / "s3") as s3:
        input_uri, package_uri = _upload(s3, monkeypatch, folder, package_dir)
        summary = score(cfg_for(tmp_path), input_uri, package_uri, out=tmp_path / "out")
    assert {p["file"]: p["prediction"] for p in read_jsonl(tmp_path / "out" / "predictions.jsonl")} == expected
    assert summary["rejected"] == 3 and summary["model"]["package"] == f"s3://{s3.bucket}/packages/v1"


def test_bad_inputs_fail_with_one_clear_error_and_leave_nothing(tiny_package, tmp_path):
    cfg, package_dir = cfg_for(tmp_path), tiny_package["out"]
    out = tmp_path / "out"
    with pytest.raises(DataError, match="no-such-folder: no such folder or S3 prefix"):
        score(cfg, str(tmp_path / "no-such-folder"), package_dir, out=out)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"no files ending in \.png, \.jpg, \.jpeg to score"):
        score(cfg, str(tmp_path / "texts"), package_dir, out=out)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="none of the 1 files could be scored"):
        score(cfg, str(tmp_path / "junk"), package_dir, out=out)
    with pytest.raises(DataError, match="no package.json"):
        score(cfg, str(tmp_path / "junk"), tmp_path / "no-package", out=out)
    assert not out.exists()


@pytest.mark.integration
def test_the_score_task_gets_the_s3_secret_with_its_optional_endpoint_like_every_step(tmp_path):
    out = tmp_path / "score.yaml"
    compiler.Compiler().compile(score_pipeline(compose([]), "c0ffee"), str(out))
    _, platform = yaml.safe_load_all(out.read_text())
    required, optional = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-score-op"]["secretAsEnv"]
    assert (required["secretName"], required["optional"], optional["secretName"], optional["optional"]) == (
        "kfp-dvc-template-s3", False, "kfp-dvc-template-s3", True)
    assert [m["envVar"] for m in required["keyToEnv"]] == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
    assert optional["keyToEnv"] == [{"envVar": "AWS_ENDPOINT_URL", "secretKey": "endpoint_url"}]  # SeaweedFS, MinIO: not AWS


def test_the_score_pipeline_runs_with_kfp_local(package_dir, samples_with_bad_files, tmp_path, monkeypatch):
    folder, expected = samples_with_bad_files
    cfg = cfg_for(tmp_path)
    monkeypatch.setenv(IMAGE_COMMIT_ENV, "c0ffee")  # this working tree plays the image of that commit
    done = run_pipeline(score_pipeline(cfg, "c0ffee"), {"input_uri": str(folder), "package_uri": str(package_dir)}, tmp_path / "kfp",
                        False, cfg)
    assert done.failure is None
    task = done.tasks["score-op"]
    assert {p["file"]: p["prediction"] for p in read_jsonl(Path(task.artifacts["scored"]) / "predictions.jsonl")} == expected
    assert task.metrics["metrics"] == {"files": len(expected) + 3, "scored": len(expected), "rejected": 3, "drift": 0.0}
    assert "drift not checked" in Path(task.artifacts["drift_report"]).read_text()


@pytest.mark.integration
def test_the_score_pipeline_reads_its_input_and_package_from_s3_with_kfp_local(package_dir, samples_with_bad_files, tmp_path,
                                                                              monkeypatch):
    folder, expected = samples_with_bad_files
    cfg = cfg_for(tmp_path)
    monkeypatch.setenv(IMAGE_COMMIT_ENV, "c0ffee")
    with seaweed_s3(tmp_path / "s3") as s3:
        input_uri, package_uri = _upload(s3, monkeypatch, folder, package_dir)
        arguments = {"input_uri": input_uri, "package_uri": package_uri}
        done = run_pipeline(score_pipeline(cfg, "c0ffee"), arguments, tmp_path / "kfp", False, cfg)
    assert done.failure is None
    task = done.tasks["score-op"]
    scored = Path(task.artifacts["scored"])
    assert {p["file"]: p["prediction"] for p in read_jsonl(scored / "predictions.jsonl")} == expected
    assert task.metrics["metrics"] == {"files": len(expected) + 3, "scored": len(expected), "rejected": 3, "drift": 0.0}
    model = json.loads((scored / "score.json").read_text())["model"]
    assert model["package"] == package_uri and model["verified_against"] == "nothing (no record outside the package's folder)"
