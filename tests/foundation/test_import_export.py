"""`import-azmanagers` / `export-azmanagers` through the session's real Prefect server.

The server is shared with other tests, so exported files are compared entry by entry for the
reference names (and the manifest is imported under a name of its own).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from prefect_azmanagers.blocks import load_manifest, load_scaleset_template, load_vm_template
from prefect_azmanagers.cli import app
from prefect_azmanagers.exceptions import ConfigurationError, TemplateNotFound
from prefect_azmanagers.templates import export_azmanagers, import_azmanagers

from .conftest import REFERENCE_DIR

TEMPLATE_FILES = ["templates_scaleset.json", "templates_vm.json", "templates_nic.json"]


def reference(filename: str) -> dict:
    return json.loads((REFERENCE_DIR / filename).read_text())


def assert_exported_equals_reference(out: Path) -> None:
    for filename in TEMPLATE_FILES:
        exported = json.loads((out / filename).read_text())
        for name, entry in reference(filename).items():
            assert exported[name] == entry, (filename, name)
    assert json.loads((out / "manifest.json").read_text()) == reference("manifest.json")


def run_cli(server, *args: str) -> Result:
    """The CLI in this process, against the session's server (the entry point itself is
    tested in test_cli.py)."""
    return CliRunner().invoke(app, list(args), env={"PREFECT_API_URL": server.api_url, "COLUMNS": "200"})


def test_import_then_export_reproduces_the_files(prefect_server, azmanagers_dir: Path, tmp_path: Path) -> None:
    manifest_name = f"imported-{uuid.uuid4().hex[:8]}"
    config = import_azmanagers(
        azmanagers_dir, manifest_name=manifest_name, overwrite=True, api_url=prefect_server.api_url
    )
    assert "ussc/t107/v4/amd/cbox176" in config.scalesets

    template = load_scaleset_template("ussc/t107/v4/amd/cbox176")
    assert template.value == reference("templates_scaleset.json")["ussc/t107/v4/amd/cbox176"]["value"]
    # Imported unchanged, including the original's "/subscription/" NIC id.
    assert load_vm_template("cbox").value == reference("templates_vm.json")["cbox"]["value"]
    assert load_manifest(manifest_name).ssh_user == "cvx"

    out = tmp_path / "exported"
    export_azmanagers(out, manifest_name=manifest_name, api_url=prefect_server.api_url)
    assert_exported_equals_reference(out)


def test_cli_import_refuses_to_overwrite_then_export_round_trips(prefect_server, azmanagers_dir: Path, tmp_path: Path) -> None:
    manifest_name = f"cli-{uuid.uuid4().hex[:8]}"
    first = run_cli(prefect_server, "import-azmanagers", "--dir", str(azmanagers_dir), "--overwrite",
                    "--manifest-name", manifest_name)
    assert first.exit_code == 0, first.stdout + first.stderr
    assert "ussc--t107--v4--amd--cbox176" in first.stdout

    again = run_cli(prefect_server, "import-azmanagers", "--dir", str(azmanagers_dir), "--manifest-name", manifest_name)
    assert again.exit_code == 1
    assert "exist already" in again.stderr and "--overwrite" in again.stderr and "Traceback" not in again.stderr

    out = tmp_path / "cli-export"
    result = run_cli(prefect_server, "export-azmanagers", "--dir", str(out), "--manifest-name", manifest_name)
    assert result.exit_code == 0, result.stderr
    assert_exported_equals_reference(out)


def test_cli_import_of_malformed_json_gives_position_and_no_traceback(prefect_server, azmanagers_dir: Path) -> None:
    (azmanagers_dir / "templates_nic.json").write_text('{"cbox-nic": [1, 2,, 3]}')
    result = run_cli(prefect_server, "import-azmanagers", "--dir", str(azmanagers_dir), "--overwrite")
    assert result.exit_code == 1
    assert "templates_nic.json is not valid JSON" in result.stderr and "line 1, column 20" in result.stderr
    assert "Traceback" not in result.stderr


def test_nothing_is_saved_when_any_entry_is_bad(prefect_server, azmanagers_dir: Path) -> None:
    fresh = f"fresh/{uuid.uuid4().hex[:8]}"
    entries = reference("templates_scaleset.json")
    entries[fresh] = entries["cbox08"]
    entries["broken"] = {"subscriptionid": "S", "resourcegroup": "r", "value": []}
    (azmanagers_dir / "templates_scaleset.json").write_text(json.dumps(entries))
    with pytest.raises(ConfigurationError, match="'broken'"):
        import_azmanagers(azmanagers_dir, overwrite=True)
    with pytest.raises(TemplateNotFound):
        load_scaleset_template(fresh)
