"""Local references: checked with symlinks resolved, and handed to the engine as the path that was
checked, so a link swapped afterwards changes nothing; where a link leads outside is never said."""

from __future__ import annotations

import pytest

from service.config import Settings
from service.sources import LocalSources, OutsideDataRoots, read_limits


def test_a_reference_is_read_by_the_path_that_was_checked_not_by_its_link(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "alice").mkdir(parents=True)
    outside.mkdir()
    link = root / "request-1"
    link.symlink_to(root / "alice")
    path = LocalSources([root], tmp_path / "downloads").path(f"file://{link}")
    link.unlink()
    link.symlink_to(outside)  # swapped after the check
    assert path == (root / "alice").resolve()


def test_a_link_leading_outside_the_roots_is_refused_without_saying_where(tmp_path):
    root, secret = tmp_path / "root", tmp_path / "secret-place"
    root.mkdir()
    secret.mkdir()
    (root / "request-1").symlink_to(secret)
    with pytest.raises(OutsideDataRoots) as refused:
        LocalSources([root], tmp_path / "downloads").path(f"file://{root / 'request-1'}")
    assert "secret-place" not in refused.value.detail


def test_files_must_lie_in_the_real_data_roots_or_the_runs_download_folder_once_opened(tmp_path):
    real = tmp_path / "real-root"
    real.mkdir()
    (tmp_path / "root").symlink_to(real)
    settings = Settings(home=tmp_path / "home", data_roots=f"{tmp_path / 'root'},s3://bucket/sets")
    limits = read_limits(settings, also_within=(tmp_path / "run" / "sources",))
    assert limits.within == (str(real.resolve()), str((tmp_path / "run" / "sources").resolve()))
