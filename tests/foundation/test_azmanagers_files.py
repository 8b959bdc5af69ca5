"""Reading and writing ~/.azmanagers without a Prefect server: shapes, errors, round trip."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefect_azmanagers.blocks import NICTemplate, ScaleSetTemplate, VMTemplate
from prefect_azmanagers.exceptions import ConfigurationError, TemplateError
from prefect_azmanagers.templates import import_azmanagers, read_azmanagers, write_azmanagers

from .conftest import REFERENCE_DIR

FILES = ["manifest.json", "templates_scaleset.json", "templates_vm.json", "templates_nic.json"]


def test_read_maps_every_file_to_blocks(azmanagers_dir: Path) -> None:
    config = read_azmanagers(azmanagers_dir)
    assert config.manifest.subscription_id == "xxxxxxxx-0000-1111-2222-333333333333"
    assert config.manifest.ssh_private_key_file == "/home/cvx/.ssh/azmanagers_rsa"
    assert sorted(config.scalesets) == ["cbox08", "ussc/t107/v4/amd/cbox176"]
    assert config.scalesets["cbox08"].value["sku"]["name"] == "Standard_D8s_v3"
    assert list(config.vms) == ["cbox"] and list(config.nics) == ["cbox-nic"]


def test_write_of_read_reproduces_the_files(azmanagers_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    written = write_azmanagers(read_azmanagers(azmanagers_dir), out)
    assert sorted(p.name for p in written) == sorted(FILES)
    for name in FILES:
        assert json.loads((out / name).read_text()) == json.loads((REFERENCE_DIR / name).read_text()), name
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "manifest.json").stat().st_mode) == 0o600


def test_missing_files_are_simply_absent(tmp_path: Path) -> None:
    (tmp_path / "templates_nic.json").write_text((REFERENCE_DIR / "templates_nic.json").read_text())
    config = read_azmanagers(tmp_path)
    assert config.manifest is None and not config.scalesets and list(config.nics) == ["cbox-nic"]


def test_a_file_that_is_not_text_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "templates_vm.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigurationError, match="templates_vm.json: not UTF-8 text"):
        read_azmanagers(tmp_path)


def test_importing_a_folder_without_azmanagers_files_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="holds none of manifest.json, templates_scaleset.json"):
        import_azmanagers(tmp_path)


def test_not_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="is not a directory"):
        read_azmanagers(tmp_path / "nope")


def test_malformed_json_names_file_line_and_column(azmanagers_dir: Path) -> None:
    path = azmanagers_dir / "templates_vm.json"
    path.write_text('{"cbox": {\n  "subscriptionid": "SUB",\n  "value": {"location": }\n}}\n')
    with pytest.raises(ConfigurationError, match=r"templates_vm\.json is not valid JSON: .* line 3, column 25"):
        read_azmanagers(azmanagers_dir)


def test_template_of_wrong_shape_is_named(azmanagers_dir: Path) -> None:
    path = azmanagers_dir / "templates_scaleset.json"
    entries = json.loads(path.read_text())
    del entries["ussc/t107/v4/amd/cbox176"]["value"]["sku"]["name"]
    path.write_text(json.dumps(entries))
    with pytest.raises(TemplateError, match=r"ScaleSetTemplate 'ussc/t107/v4/amd/cbox176' is malformed: .*sku\.name"):
        read_azmanagers(azmanagers_dir)


def test_manifest_without_subscription_is_refused(azmanagers_dir: Path) -> None:
    (azmanagers_dir / "manifest.json").write_text(json.dumps({"resourcegroup": "rg", "ssh_user": "u"}))
    with pytest.raises(ConfigurationError, match="has no subscriptionid"):
        read_azmanagers(azmanagers_dir)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["sku", "name", "location", "properties", "value", "x"]), children, max_size=4),
    max_leaves=12,
)
ENTRY_KEYS = st.sampled_from(["subscriptionid", "resourcegroup", "tempdisk", "value", "other"])


def _near_valid_entry(kind: str) -> st.SearchStrategy:
    """Reference entries with a random sub-tree replaced or removed: mostly *almost* right."""
    filename = {"scaleset": "templates_scaleset.json", "vm": "templates_vm.json", "nic": "templates_nic.json"}[kind]
    original = next(iter(json.loads((REFERENCE_DIR / filename).read_text()).values()))

    def mutate(draw_path: list[str], replacement) -> object:
        document = json.loads(json.dumps(original))
        node = document
        for key in draw_path[:-1]:
            if not isinstance(node, dict) or key not in node:
                return document
            node = node[key]
        if isinstance(node, dict):
            if replacement is _DELETE:
                node.pop(draw_path[-1], None)
            else:
                node[draw_path[-1]] = replacement
        return document

    paths = st.lists(
        st.sampled_from(["value", "properties", "virtualMachineProfile", "osProfile", "sku", "name",
                         "location", "hardwareProfile", "vmSize", "ipConfigurations", "subscriptionid",
                         "adminUsername", "storageProfile", "networkProfile"]),
        min_size=1, max_size=5,
    )
    return st.builds(mutate, paths, st.just(_DELETE) | JSON)


_DELETE = object()
BLOCKS = {"scaleset": ScaleSetTemplate, "vm": VMTemplate, "nic": NICTemplate}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(BLOCKS)), st.data())
def test_any_document_loads_or_raises_template_error(kind: str, data) -> None:
    document = data.draw(_near_valid_entry(kind) | JSON | st.dictionaries(ENTRY_KEYS, JSON))
    try:
        block = BLOCKS[kind].from_azmanagers("fuzzed/name", document)
    except TemplateError as exc:
        assert "fuzzed/name" in str(exc)
    else:
        # What the control plane reads from a template is there, with the right type.
        value = block.value
        if kind == "scaleset":
            assert isinstance(value["sku"]["name"], str)
            assert isinstance(value["properties"]["virtualMachineProfile"]["osProfile"]["adminUsername"], str)
        elif kind == "vm":
            assert isinstance(value["properties"]["hardwareProfile"]["vmSize"], str)
        else:
            assert isinstance(value["properties"]["ipConfigurations"], list)
        assert isinstance(value["location"], str)
        assert BLOCKS[kind].from_azmanagers("again", block.to_azmanagers()) == block


@settings(max_examples=100, deadline=None)
@given(JSON)
def test_any_template_file_reads_or_raises_configuration_error(tmp_path_factory, document) -> None:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "templates_scaleset.json").write_text(json.dumps(document))
    try:
        read_azmanagers(root)
    except ConfigurationError:
        pass
