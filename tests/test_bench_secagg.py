"""`fedmri bench secagg`: the cohort, Flower's SecAgg+ settings, and a real small run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
from flwr.server.workflow import SecAggPlusWorkflow

from fedmri.deploy.bench.secagg import missing_components, ratios
from fedmri.deploy.bench.server_apps import (
    MODULUS,
    secaggplus_error_bound,
    secaggplus_settings,
)
from fedmri.deploy.bench.vectors import BenchCohort, parse_examples

FEDMRI = [sys.executable, "-m", "fedmri.common.cli"]
MEASURES = ("seconds_per_round", "client_cpu_s", "server_cpu_s", "upload_bytes_per_client",
            "server_peak_mb", "max_abs_error")


def test_cohort_vectors_and_exact_mean() -> None:
    cohort = BenchCohort(clients=3, params=500, examples=(1, 2, 5), seed=7)
    expected = np.random.default_rng([7, 1]).normal(0, 0.05, 500).astype(np.float32)
    assert np.array_equal(cohort.vector(1), expected)
    vectors = np.stack([cohort.vector(i).astype(np.float64) for i in range(3)])
    assert np.allclose(cohort.exact_mean(), np.average(vectors, axis=0, weights=[1, 2, 5]),
                       rtol=0, atol=1e-15)
    again = BenchCohort.from_run_config(cohort.to_run_config())
    assert again == cohort
    with pytest.raises(ValueError, match="outside 0..2"):
        cohort.vector(3)


def test_examples_one_for_all_or_one_each() -> None:
    assert parse_examples("1000", 3) == (1000, 1000, 1000)
    assert parse_examples("5,6,7", 3) == (5, 6, 7)
    for bad in ("5,6", "a", "0"):
        with pytest.raises(ValueError):
            parse_examples(bad, 3)


@pytest.mark.parametrize("clients", [2, 3, 5, 8, 40, 300])
def test_secaggplus_settings_are_valid_and_cannot_overflow(clients: int) -> None:
    cohort = BenchCohort(clients=clients, params=10)
    settings = secaggplus_settings(cohort)
    SecAggPlusWorkflow(**settings)  # Flower's own checks accept them
    quant = settings["quantization_range"]
    assert quant & (quant - 1) == 0 and quant <= 2**24
    assert clients * quant < MODULUS  # N values of at most Q, and the N weight factors
    shares = clients if isinstance(settings["num_shares"], float) else settings["num_shares"]
    assert 2 * settings["reconstruction_threshold"] > shares >= settings["reconstruction_threshold"]


def test_components_that_do_not_exist_are_reported() -> None:
    apps = "fedmri.deploy.bench.server_apps"
    missing = missing_components([f"{apps}:plain_app", f"{apps}:no_such_app",
                                  "fedmri.no_such_module:app"])
    assert set(missing) == {f"{apps}:no_such_app", "fedmri.no_such_module:app"}


def test_ratios_need_both_sides() -> None:
    results = {"plain": {"seconds_per_round": 2.0, "upload_bytes_per_client": 400.0,
                         "max_abs_error": 0.0},
               "flower": {"seconds_per_round": 10.0, "upload_bytes_per_client": 800.0,
                          "max_abs_error": 1e-7},
               "ours": {"skipped": "not available yet"}}
    got = ratios(results)
    assert got["upload_flower_over_plain"] == 2.0 and got["seconds_flower_over_plain"] == 5.0
    assert got["overhead_ours_over_flower"] is None and got["error_ours_over_flower"] is None
    results["ours"] = {"seconds_per_round": 4.0, "upload_bytes_per_client": 1200.0,
                       "max_abs_error": 2e-8}
    got = ratios(results)
    assert got["overhead_ours_over_flower"] == pytest.approx(0.25)
    assert got["upload_ours_over_plain"] == 3.0
    assert got["error_ours_over_flower"] == pytest.approx(0.2)
    assert got["overhead_ours_over_flower_after_round_1"] is None  # no per-round figures
    for variant, per_round in (("plain", [2.0, 2.0]), ("flower", [12.0, 8.0]),
                               ("ours", [7.0, 3.0])):
        results[variant]["rounds"] = [{"seconds": s} for s in per_round]
    got = ratios(results)
    assert got["overhead_ours_over_flower_after_round_1"] == pytest.approx(1 / 6)
    assert got["overhead_ours_over_flower"] == pytest.approx(0.25)  # from seconds_per_round


def _tagged_processes(tag: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("FEDMRI_TEST_TAG") == tag:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.mark.slow
def test_bench_runs_plain_flower_secaggplus_and_ours(tmp_path: Path) -> None:
    clients, params = 3, 2000
    tag = uuid.uuid4().hex  # every process the bench starts inherits it
    env = {**os.environ, "FEDMRI_TEST_TAG": tag}
    out = tmp_path / "bench"
    done = subprocess.run([*FEDMRI, "bench", "secagg", "--clients", str(clients), "--params",
                           str(params), "--rounds", "1", "--examples", "500,1000,1500",
                           "--variants", "plain,flower,ours", "--out", str(out), "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert set(result) == {"config", "plain", "flower", "ours", "ratios"}
    assert result["config"]["clients"] == clients and result["config"]["params"] == params
    for name in ("plain", "flower", "ours"):
        variant = result[name]
        for key in MEASURES:
            assert isinstance(variant[key], float | int) and variant[key] >= 0, (name, key)
        assert variant["seconds_per_round"] > 0 and variant["server_cpu_s"] > 0
        assert variant["client_cpu_s"] > 0 and variant["server_peak_mb"] > 10
    plain, flower = result["plain"], result["flower"]
    # Plain uploads the float32 vector (4 bytes a parameter) and a few hundred bytes of records.
    assert 4 * params <= plain["upload_bytes_per_client"] <= 1.1 * 4 * params
    # SecAgg+ uploads masked int64 (8 bytes a parameter) plus keys and shares, in 4 messages.
    assert flower["upload_bytes_per_client"] > 2 * 4 * params
    assert plain["client_processes"] == clients and flower["client_processes"] == 4 * clients
    assert plain["max_abs_error"] < 1e-6
    bound = flower["details"]["error_bound"]
    cohort = BenchCohort(clients=clients, params=params, rounds=1, examples=(500, 1000, 1500))
    assert bound == pytest.approx(
        secaggplus_error_bound(cohort, secaggplus_settings(cohort)))
    assert 0 < flower["max_abs_error"] < bound  # quantized, so never exact, but bounded
    assert result["ratios"]["upload_flower_over_plain"] > 2
    ours = result["ours"]
    # Masked uint32 (4 bytes a parameter) plus shares and signed keys, in 3 messages.
    assert 4 * params < ours["upload_bytes_per_client"] < 1.5 * 4 * params
    assert ours["client_processes"] == 3 * clients  # advertise, mask, unmask (round 1)
    assert 0 < ours["max_abs_error"] <= ours["details"]["error_bound"]
    assert result["ratios"]["overhead_ours_over_flower"] is not None
    saved = json.loads((out / "bench-secagg.json").read_text())
    assert saved["flower"]["max_abs_error"] == flower["max_abs_error"]
    assert "running on https://127.0.0.1" in (out / "plain" / "logs" / "superlink.log").read_text()
    assert _tagged_processes(tag) == []
