"""What a server or a scorer loads is checked against the hash the pipeline recorded outside the artifact's folder
(components/core/recorded.py): a copy of this project whose pipeline is one real DVC stage writing a real small
package, real git; the archive replaced together with the package.json beside it, and an edited model.onnx, are refused.
The deploy goes to a TorchServe URL where nothing listens: a refusal comes before any server is asked."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from components.core.io import file_digest
from components.core.recorded import IntegrityError, Recorded
from components.deploy import deploy
from tests.helpers.project import copy_project, git_commit, run
from tests.helpers.servers import free_ports

pytestmark = pytest.mark.integration  # a git repository, DVC and the CLIs in subprocesses

PIPELINE = """stages:
  package:
    cmd: rm -rf artifacts/package && mkdir -p artifacts && cp -r evidence/package artifacts/package
    deps:
      - evidence
    outs:
      - artifacts/package
artifacts:
  digits:
    path: artifacts/package
    type: model
"""


@pytest.fixture(scope="module")
def template(tiny_package, tmp_path_factory) -> Path:
    """main: a real small package written by the `package` stage (dvc.lock records it), committed."""
    repo = copy_project(tmp_path_factory.mktemp("integrity") / "repo", with_data=False)
    shutil.copytree(tiny_package["out"], repo / "evidence" / "package")
    (repo / "dvc.yaml").write_text(PIPELINE)
    (repo / "dvc.lock").unlink()
    run(["dvc", "repro", "package"], repo)
    git_commit(repo, "package")
    return repo


@pytest.fixture
def repo(template: Path, tmp_path: Path) -> Path:
    """A private copy (git history, DVC cache and the package included)."""
    return Path(shutil.copytree(template, tmp_path / "repo", symlinks=True))


def head(repo: Path) -> str:
    return run(["git", "rev-parse", "HEAD"], repo).stdout.strip()


def serve_up_to_nowhere(repo: Path, store: Path):
    management, inference = free_ports(2)
    return run(["python", "-m", "serve", "up", "--management-url", f"http://127.0.0.1:{management}",
                "--inference-url", f"http://127.0.0.1:{inference}", "--model-store", str(store)], repo, check=False)


def test_an_archive_replaced_with_a_package_json_to_match_is_not_deployed(repo, tmp_path):
    package_dir = repo / "artifacts" / "package"
    manifest = json.loads((package_dir / "package.json").read_text())
    mar = package_dir / manifest["mar"]["file"]
    untouched = serve_up_to_nowhere(repo, tmp_path / "store")
    assert untouched.returncode == 2 and "records" not in untouched.stderr, untouched.stderr  # checked, then the server is asked
    assert list((tmp_path / "store").glob("*.mar"))  # copied to the model store
    recorded = file_digest(mar, "md5")

    with zipfile.ZipFile(mar, "a") as archive:  # modified handler code, say
        archive.writestr("backdoor.py", "print('hello')\n")
    manifest["mar"]["sha256"] = file_digest(mar)
    (package_dir / "package.json").write_text(json.dumps(manifest))
    refused = serve_up_to_nowhere(repo, tmp_path / "store2")
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"error: artifacts/package/{mar.name}: md5 {file_digest(mar, 'md5')}, but dvc.lock at {head(repo)[:10]} records {recorded}: "
        "the file changed after the pipeline wrote it; refusing to load it (`dvc checkout` restores the recorded one)")
    assert not (tmp_path / "store2").exists()  # nothing copied to the model store


def edit_model(model_file: Path) -> None:
    """Shift one weight tensor: still a valid model, answering differently."""
    model = onnx.load(model_file)
    weights = next(w for w in model.graph.initializer if w.data_type == onnx.TensorProto.FLOAT)
    weights.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights) + 1, weights.name))
    onnx.save(model, model_file)


def scoring(tiny_package, tmp_path: Path, *package: str) -> list[str]:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for sample in tiny_package["manifest"]["samples"]:
        shutil.copy(tiny_package["out"] / sample["file"], images)
    return ["python", "-m", "components.score", "--input", str(images), *package, "--out", str(tmp_path / "scored"), "score.workers=1"]


def test_an_edited_model_is_not_used_for_batch_scoring(repo, tiny_package, tmp_path):
    score = scoring(tiny_package, tmp_path, "--package", "artifacts/package")
    run(score, repo)
    clean = json.loads((tmp_path / "scored" / "score.json").read_text())

    model_file = repo / "artifacts" / "package" / "model.onnx"
    recorded = file_digest(model_file, "md5")
    edit_model(model_file)
    refused = run(score, repo, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: artifacts/package/model.onnx: md5 {file_digest(model_file, 'md5')}, but dvc.lock at {head(repo)[:10]} records {recorded}: "
        "the file changed after the pipeline wrote it; refusing to load it (`dvc checkout` restores the recorded one)")
    assert clean["model"]["verified_against"] == f"dvc.lock at {head(repo)[:10]}"


def test_a_model_edited_in_the_dvc_remote_is_not_used_for_scoring_a_tagged_version(repo, tiny_package, tmp_path):
    """`score --tag` fetches the package from the DVC remote, which does not check what it serves against dvc.lock."""
    run(["dvc", "remote", "add", "-f", "-d", "storage", str(tmp_path / "remote")], repo)
    git_commit(repo, "a DVC remote")
    run(["dvc", "push"], repo)
    run(["gto", "register", "digits", "--version", "v1.0.0"], repo)
    recorded = file_digest(repo / "artifacts" / "package" / "model.onnx", "md5")
    stored = tmp_path / "remote" / "files" / "md5" / recorded[:2] / recorded[2:]
    stored.chmod(0o644)
    edit_model(stored)
    refused = run(scoring(tiny_package, tmp_path, "--tag", "digits@v1.0.0"), repo, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].endswith(
        f"/model.onnx: md5 {file_digest(stored, 'md5')}, but dvc.lock at {head(repo)[:10]} records {recorded}: "
        "the file changed after the pipeline wrote it; refusing to load it (`dvc checkout` restores the recorded one)")


def test_a_kfp_deploy_checks_the_archive_against_the_package_artifacts_metadata(tiny_package, tmp_path):
    """The KFP deploy component passes the md5 the package component put in the artifact's metadata."""
    package_dir = Path(shutil.copytree(tiny_package["out"], tmp_path / "package"))
    manifest = tiny_package["manifest"]
    recorded = Recorded("0" * 32, "the KFP package artifact's metadata")
    with pytest.raises(IntegrityError, match=f"md5 {file_digest(package_dir / manifest['mar']['file'], 'md5')}, but the KFP package "
                                             f"artifact's metadata records {'0' * 32}"):
        deploy(tiny_package["cfg"], package_dir / manifest["mar"]["file"], manifest["version"], "http://127.0.0.1:1", None,
               inference_url="http://127.0.0.1:1", model_store=tmp_path / "store", recorded=recorded)
