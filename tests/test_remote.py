"""Remote folders (components/core/remote.py) against a real S3 server (SeaweedFS): a download and a listing hash
refuse a missing prefix and denied access each in one DataError naming the URI, and download what is there."""

from __future__ import annotations

import pytest

from components.core.errors import DataError
from components.core.remote import download_folder, listing_hash
from tests.helpers.servers import seaweed_s3


@pytest.mark.integration
def test_a_missing_prefix_and_denied_access_are_one_error_naming_the_uri(tmp_path, monkeypatch):
    import s3fs

    with seaweed_s3(tmp_path / "s3") as s3:
        for name, value in s3.client_env().items():
            monkeypatch.setenv(name, value)
        s3fs.S3FileSystem(skip_instance_cache=True).pipe(f"{s3.bucket}/data/a/1.txt", b"one")
        uri = f"s3://{s3.bucket}/data"
        assert (download_folder(uri, tmp_path / "got", "score.input") / "a" / "1.txt").read_bytes() == b"one"
        assert listing_hash(uri, "pipeline.data.uri").startswith("sha256:")
        for missing in (f"s3://{s3.bucket}/nothing-here", "s3://no-such-bucket/data"):
            with pytest.raises(DataError, match=f"^{missing}: no such folder or S3 prefix \\(pipeline.data.uri\\)$"):
                listing_hash(missing, "pipeline.data.uri")
            with pytest.raises(DataError, match=f"^{missing}: no such folder or S3 prefix \\(score.input\\)$"):
                download_folder(missing, tmp_path / "none", "score.input")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        s3fs.S3FileSystem.clear_instance_cache()
        for read in (lambda: listing_hash(uri, "pipeline.data.uri"), lambda: download_folder(uri, tmp_path / "denied", "score.input")):
            with pytest.raises(DataError, match=f"^{uri}: access denied .*; check the S3 credentials$"):
                read()
    assert not (tmp_path / "none").exists() and not any((tmp_path / "denied").glob("**/*.txt"))
