"""End to end: `fedmri simulate` with real flower-superlink / flower-supernode processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from spatial_check import assert_same_model

from fedmri.client.train_cli import score_site
from fedmri.common.checkpoint import save_model
from fedmri.common.models import build_model, load_model

pytestmark = pytest.mark.slow
UNTRAINED_MARGIN = 0.03  # seed 5: 0.20 trained against 0.12 untrained
# A hospital training on 2 ranks against 1: float32 summation order through one local step
# (see tests/test_spatial_hospital.py) plus the stochastic rounding of secure aggregation.
SPLIT_TOLERANCE = 2e-2

FEDMRI = [sys.executable, "-m", "fedmri.common.cli"]
SMALL = ["--hospitals", "2", "--rounds", "2", "--subjects", "3", "--size", "32",
         "--local-epochs", "1", "--seed", "5"]


def _flower_processes(out: Path) -> list[psutil.Process]:
    """The processes of the federation simulated in `out`: the daemons and their children
    (their homes, FLWR_HOME or secrets lie inside it)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if proc.pid == os.getpid() or "fedmri.common.cli simulate" in cmd:
                continue
            if str(out) in cmd or proc.environ().get("FLWR_HOME", "").startswith(str(out)):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _env() -> dict[str, str]:
    return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def _synth(folder: Path, hospitals: int, subjects: int, seed: int) -> Path:
    data = folder / "data"
    done = subprocess.run([*FEDMRI, "synth", "--hospitals", str(hospitals), "--subjects",
                           str(subjects), "--seed", str(seed), "--out", str(data)],
                          capture_output=True, text=True, env=_env())
    assert done.returncode == 0, done.stderr
    return data


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _synth(tmp_path_factory.mktemp("cohort"), hospitals=2, subjects=3, seed=5)


@pytest.fixture(scope="module")
def finished_run(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    done = subprocess.run([*FEDMRI, "simulate", *SMALL, "--data", str(cohort), "--out", str(out)],
                          capture_output=True, text=True, env=_env(), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "round 1:" in done.stdout and "round 2:" in done.stdout  # progress per round
    return out


def test_simulate_writes_report_model_and_plots(finished_run: Path, cohort: Path) -> None:
    report = json.loads((finished_run / "report.json").read_text())
    assert report["config"]["size"] == 32 and report["config"]["mode"] == "fedavg"
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for rnd in report["rounds"]:
        assert set(rnd["hospitals"]) == {"hospital-1", "hospital-2"}
        assert rnd["bytes_up"] > 0 and rnd["bytes_down"] > 0 and rnd["seconds"] > 0
        assert 0.0 < rnd["global_val_dice"] <= 1.0
        for site in rnd["hospitals"].values():
            assert site["num_examples"] >= 1 and site["train_loss"] > 0
            assert 0.0 < site["val_dice"] <= 1.0
    model, cfg = load_model(finished_run / "global_model.pt")
    assert cfg.size == 32
    # The federation learned: the global model beats the untrained network on the test site.
    untrained = finished_run.parent / "untrained.pt"
    save_model(untrained, build_model(cfg).state_dict(), cfg.to_dict())
    baseline = score_site(untrained, cohort / "test-site", None)["dice"]
    assert baseline + UNTRAINED_MARGIN < report["test_dice"] <= 1.0, (baseline, report)
    assert model(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)
    for png in ("curves.png", "sample.png"):
        assert (finished_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_sets_up_the_federation_through_the_operators_commands(
        finished_run: Path) -> None:
    link_log = (finished_run / "coordinator" / "logs" / "superlink.log").read_text()
    assert "running on https://127.0.0.1" in link_log
    assert "root-certificates" in (finished_run / "coordinator" / "flwr" /
                                   "config.toml").read_text()
    audit = (finished_run / "server.out").read_text()
    assert "enrollment on port" in audit
    for hospital in ("hospital-1", "hospital-2"):
        home = finished_run / hospital
        # Its own keys, made at the hospital and never sent; enrolled with a ticket.
        assert (home / "node.key").stat().st_mode & 0o777 == 0o600
        assert (home / "identity.pem").stat().st_mode & 0o777 == 0o600
        assert (finished_run / "tickets" / f"{hospital}.json").stat().st_mode & 0o777 == 0o600
        assert 'member-policy = "accept-all"' in (home / "client.toml").read_text()
        served = (home / "logs" / "executor.log").read_text()
        assert served.count("event=task_done") >= 4, hospital  # the daemon's executor ran it


def test_simulate_leaves_no_processes(finished_run: Path) -> None:
    assert _flower_processes(finished_run) == []


def _simulate(cohort: Path, out: Path, *extra: str) -> Path:
    args = [*SMALL, "--rounds", "1", *extra]  # a later --rounds overrides SMALL's
    done = subprocess.run([*FEDMRI, "simulate", *args, "--data", str(cohort), "--out", str(out)],
                          capture_output=True, text=True, env=_env(), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _events(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = torch.load(out / "global_model.pt",
                                                weights_only=True)["state_dict"]
    return state


@pytest.fixture(scope="module")
def plain_run(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _simulate(cohort, tmp_path_factory.mktemp("plain") / "out", "--no-secure")


def test_simulate_is_secure_by_default(finished_run: Path) -> None:
    sums = [e for e in _events(finished_run) if e["event"] == "secure_sum"]
    assert [e["round"] for e in sums] == [1, 2]
    assert all(e["survivors"] == ["hospital-1", "hospital-2"] for e in sums)
    report = json.loads((finished_run / "report.json").read_text())
    assert report["config"]["secure"] is True


def test_same_seed_same_result(plain_run: Path, cohort: Path, tmp_path: Path) -> None:
    again = _simulate(cohort, tmp_path / "again", "--no-secure")
    first, second = _weights(plain_run), _weights(again)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    a = json.loads((plain_run / "report.json").read_text())
    b = json.loads((again / "report.json").read_text())
    assert a["test_dice"] == b["test_dice"]
    assert not any(e["event"] == "secure_sum" for e in _events(plain_run))


@pytest.fixture(scope="module")
def secure_run(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _simulate(cohort, tmp_path_factory.mktemp("secure") / "out", "--secure")


def test_secure_and_plain_models_differ_only_within_the_quantization_bound(
        plain_run: Path, secure_run: Path) -> None:
    secure = secure_run
    bound = [e for e in _events(secure) if e["event"] == "secure_sum"][0]["error_bound"]
    assert 0 < bound < 1e-4
    plain, masked = _weights(plain_run), _weights(secure)
    worst = max(float((plain[k].double() - masked[k].double()).abs().max()) for k in plain)
    assert worst > 0  # stochastic rounding really happened
    assert worst <= bound + 1e-6  # + float32 rounding of the stored weights


def test_a_hospital_splitting_its_volumes_over_two_ranks_trains_the_same_model(
        secure_run: Path, cohort: Path, tmp_path: Path) -> None:
    split = _simulate(cohort, tmp_path / "tp", "--secure", "--tp", "hospital-1=2")
    rnd = json.loads((split / "report.json").read_text())["rounds"][0]["hospitals"]
    assert rnd["hospital-1"]["mesh_setup_seconds"] > 0  # it did train on two ranks
    assert rnd["hospital-2"]["mesh_setup_seconds"] is None
    want, cfg = load_model(secure_run / "global_model.pt")
    got = _weights(split)
    image = torch.rand(1, 1, cfg.size, cfg.size, cfg.size,
                       generator=torch.Generator().manual_seed(0))
    assert_same_model(got, want, cfg, image, SPLIT_TOLERANCE)


def test_interrupt_stops_every_process(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    # Without Flower's opt-outs in our environment: simulate must set them for its processes.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    proc = subprocess.Popen([*FEDMRI, "simulate", *SMALL, "--data", str(cohort), "--out",
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 180
    # Wait until the federation is really running: the ServerApp has logged its start.
    while time.monotonic() < deadline and not list(out.glob("coordinator/runs/*/events.jsonl")):
        time.sleep(0.5)
    assert list(out.glob("coordinator/runs/*/events.jsonl")), "the run never started"
    running = _flower_processes(out)
    assert running, "no Flower processes while running"
    for flower in running:
        try:
            environ = flower.environ()
        except psutil.NoSuchProcess:  # a ClientApp that just finished
            continue
        assert environ.get("FLWR_TELEMETRY_ENABLED") == "0", flower.cmdline()
        assert environ.get("FLWR_DISABLE_UPDATE_CHECK") == "1", flower.cmdline()
        if "flower-superlink" in " ".join(flower.cmdline()):
            assert "--disable-runtime-dependency-installation" in flower.cmdline()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped" in err.decode()
    time.sleep(1)
    assert _flower_processes(out) == []
