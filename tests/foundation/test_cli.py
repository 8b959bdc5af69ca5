"""The CLI's common behaviour: `python -m`, --help with examples, --verbose, clean errors."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import click
import pytest
import typer.main
from typer.testing import CliRunner

from prefect_azmanagers.cli import app
from prefect_azmanagers.templates import build_nictemplate, build_sstemplate, build_vmtemplate

OWN_COMMANDS = [
    ["manifest", "write"], ["manifest", "show"], ["template", "list"], ["template", "show"],
    ["template", "build-scaleset"], ["template", "build-vm"], ["template", "build-nic"],
    ["import-azmanagers"], ["export-azmanagers"], ["keygen"],
]


@pytest.mark.parametrize("command", OWN_COMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Example: prefect-azmanagers " + " ".join(command) in result.output


@pytest.mark.parametrize(("command", "builder"), [
    ("build-scaleset", build_sstemplate), ("build-vm", build_vmtemplate), ("build-nic", build_nictemplate),
])
def test_build_commands_take_every_builder_keyword_with_its_default(command: str, builder) -> None:
    """The build commands restate their builder's keywords as options; they must not drift apart."""
    repeatable = {"data_disk": "data_disks", "tag": "tags"}   # singular on the command line
    root = typer.main.get_command(app)
    click_command = root.get_command(click.Context(root), "template").commands[command]
    options = {repeatable.get(p.name, p.name): p for p in click_command.params
               if p.name not in ("save", "overwrite")}
    parameters = inspect.signature(builder).parameters
    assert options.keys() == parameters.keys()
    for name, parameter in parameters.items():
        if parameter.default is inspect.Parameter.empty:
            assert options[name].required, name
        elif name not in repeatable.values():
            assert options[name].default == parameter.default, name


def test_root_lists_every_noun() -> None:
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    for noun in ["manifest", "template", "import-azmanagers", "export-azmanagers", "keygen",
                 "localcloud", "scalesets", "vms", "detached", "job"]:
        assert f" {noun} " in result.output, noun
    assert " vm " not in result.output  # a hidden alias: `vm` and `vms` were easy to confuse


def test_a_localcloud_command_imports_neither_prefect_nor_the_azure_sdk(tmp_path) -> None:
    """Each noun's module is imported when the noun is used: `localcloud stop` is quick."""
    script = ("import sys\n"
              "from typer.testing import CliRunner\n"
              "from prefect_azmanagers.cli import app\n"
              f"result = CliRunner().invoke(app, ['localcloud', 'stop', '--state-dir', {str(tmp_path)!r}])\n"
              "print(result.exit_code, result.output.strip().replace('\\n', ' '))\n"
              "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'azure'}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    outcome, imported = done.stdout.strip().splitlines()
    assert outcome.startswith("0 "), outcome
    assert imported == "[]", f"the localcloud command imported {imported}"


def test_vm_stays_an_alias_of_detached() -> None:
    for noun in ("vm", "detached"):
        result = CliRunner().invoke(app, [noun, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0 and "addproc" in result.output, result.output


def run_module(*args: str, api_url: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prefect_azmanagers.cli", *args], capture_output=True, text=True,
        timeout=300, env=dict(os.environ, PREFECT_API_URL=api_url, COLUMNS="200"),
    )


def test_python_m_verbose_logs_debug_and_user_errors_have_no_traceback(prefect_server) -> None:
    quiet = run_module("manifest", "show", "nobody", api_url=prefect_server.api_url)
    verbose = run_module("--verbose", "manifest", "show", "nobody", api_url=prefect_server.api_url)
    for result in (quiet, verbose):
        assert result.returncode == 1
        assert "Error: No manifest named 'nobody'" in result.stderr and "Traceback" not in result.stderr
    assert "prefect_azmanagers.blocks DEBUG Loading manifest 'nobody'" in verbose.stderr
    assert "DEBUG" not in quiet.stderr


def test_unreachable_prefect_api_is_one_clean_line() -> None:
    result = run_module("template", "list", api_url="http://127.0.0.1:9/api")
    assert result.returncode == 1
    assert "Cannot reach the Prefect API (http://127.0.0.1:9/api)" in result.stderr
    assert "Traceback" not in result.stderr
