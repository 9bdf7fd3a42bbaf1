"""The bundled dataset regenerates byte-identically on this machine and is checked against data.dvc."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from tests.helpers.project import copy_project, run


@pytest.mark.integration
def test_regenerated_sample_matches_the_hash_in_data_dvc(tmp_path):
    repo = copy_project(tmp_path / "repo", with_data=False)
    result = run(["python", "-m", "components.data.sample", "ensure"], repo)
    assert "hash matches data.dvc" in result.stdout
    assert run(["dvc", "status", "--json", "data.dvc"], repo).stdout.strip() == "{}"
    table = pd.read_csv(repo / "data" / "metadata.csv")
    assert len(table) == 1797 and list(table.columns) == ["file", "label", "site"]
    assert table["site"].value_counts().to_dict().keys() == {"site_a", "site_b"}
    assert 0.25 < (table["site"] == "site_b").mean() < 0.35
    # A second call leaves existing data alone.
    assert "present" in run(["python", "-m", "components.data.sample", "ensure"], repo).stdout


@pytest.mark.integration
def test_mismatch_with_data_dvc_is_an_error(tmp_path):
    repo = copy_project(tmp_path / "repo", with_data=False)
    dvc_file = repo / "data.dvc"
    original = dvc_file.read_text()
    dvc_file.write_text(re.sub(r"md5: [0-9a-f]{32}\.dir", "md5: 0123456789abcdef0123456789abcdef.dir", original))
    result = run(["python", "-m", "components.data.sample", "ensure"], repo, check=False)
    assert result.returncode == 2
    assert "does not match data.dvc" in result.stderr
    assert dvc_file.read_text() != original and not (repo / "data").exists()
