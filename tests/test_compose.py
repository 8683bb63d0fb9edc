"""deploy/compose.yaml without a Docker engine: generated from the topology `fedmri simulate`
runs, valid against the Compose specification, every fedmri command line one the CLI
accepts, and each hospital isolated (its own network, volumes and read-only data)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedmri.common import cli
from fedmri.deploy import compose
from fedmri.deploy.compose_check import fedmri_commands, validate
from fedmri.deploy.simulate import SimulateOptions, topology

COMPOSE = Path(__file__).resolve().parents[1] / "deploy" / "compose.yaml"


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def test_the_file_is_what_the_topology_generates() -> None:
    assert compose.main(["--check", str(COMPOSE)]) == 0


def test_a_stale_file_is_caught(tmp_path: Path) -> None:
    stale = tmp_path / "compose.yaml"
    stale.write_text(COMPOSE.read_text().replace("--rounds 3", "--rounds 4"))
    assert compose.main(["--check", str(stale)]) == 1


def test_it_is_valid_compose(spec: dict[str, Any]) -> None:
    assert validate(COMPOSE) == []


class _Parsed(Exception):
    def __init__(self, args: argparse.Namespace) -> None:
        self.args_ = args


def _parse_only(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """What the fedmri CLI makes of `argv`, stopped right after parsing (nothing runs)."""
    parse = argparse.ArgumentParser.parse_args

    def stop(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        raise _Parsed(parse(self, args, namespace))

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", stop)
        with pytest.raises(_Parsed) as parsed:
            cli.main(argv)
    return parsed.value.args_


def test_every_command_line_is_one_the_cli_accepts(spec: dict[str, Any],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    commands = fedmri_commands(spec)
    services = {service for service, _ in commands}
    assert services == set(spec["services"])  # every service runs fedmri
    for service, argv in commands:
        try:
            _parse_only(argv, monkeypatch)
        except SystemExit as err:  # argparse refused it
            pytest.fail(f"{service}: fedmri {' '.join(argv)} is refused ({err})")


def test_a_wrong_flag_would_be_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit):
        _parse_only(["client", "--home", "/state", "init", "--tikcet", "x", "--data", "/d"],
                    monkeypatch)


def _flags(argv: list[str]) -> list[str]:
    return [word for word in argv if word.startswith("--") and word != "--home"]


def test_simulate_runs_the_same_commands_with_the_same_flags(spec: dict[str, Any]) -> None:
    """Per step, the subcommand and its flags match what `fedmri simulate` runs (values such
    as paths, ports and the run's size differ)."""
    local = topology(SimulateOptions(out=Path("/x"), hospitals=3), ["hospital-1", "hospital-2",
                                                                    "hospital-3"])
    h1 = local.hospitals[0]
    expected = {
        "coordinator-init": [local.server_init("H", "127.0.0.1", 1, 2, "127.0.0.1")],
        "coordinator": [local.server_start("H")],
        "hospital-1-ticket": [local.token("H", "hospital-1", "T")],
        "hospital-1": [local.client_init("H", h1, "T", "D"), local.client_start("H")],
        "run": [local.run_start("H"), local.run_report("H", "O", "D")],
    }
    found: dict[str, list[list[str]]] = {}
    for service, argv in fedmri_commands(spec):
        found.setdefault(service, []).append(argv)
    for service, steps in expected.items():
        # `fedmri COMMAND --home DIR SUBCOMMAND ...`: the same commands in the same order
        assert [(s[0], s[3]) for s in found[service]] == [(s[0], s[3]) for s in steps], service
        for got, want in zip(found[service], steps, strict=True):
            # simulate's run config spells every field out; Compose names a few
            assert set(_flags(got)) <= set(_flags(want)), (service, got, want)


def test_each_hospital_is_isolated(spec: dict[str, Any]) -> None:
    services = spec["services"]
    hospitals = [f"hospital-{i}" for i in (1, 2, 3)]
    assert all(spec["networks"][f"{h}-net"]["internal"] for h in hospitals)
    for h in hospitals:
        svc = services[h]
        assert svc["networks"] == [f"{h}-net"]
        on_net = [name for name, s in services.items() if f"{h}-net" in s.get("networks", [])]
        assert sorted(on_net) == sorted([h, "coordinator"])
        mounts = {v.split(":")[0]: v for v in svc["volumes"]}
        assert mounts[f"data-{h}"].endswith(":ro")  # the data is only read
        for volume in mounts:  # no other hospital and not the coordinator mounts it
            users = [name for name, s in services.items()
                     if any(v.split(":")[0] == volume for v in s.get("volumes", []))]
            assert set(users) <= {h, f"{h}-ticket", f"{h}-data"}, (volume, users)
    # one-shot set-up steps reach no network
    for name in ("coordinator-init", *[f"{h}-ticket" for h in hospitals],
                 *[f"{h}-data" for h in hospitals]):
        assert services[name]["network_mode"] == "none"
