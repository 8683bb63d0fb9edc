"""End to end: a coordinator and three hospitals set up only through `fedmri server`,
`fedmri client` and `fedmri run` (fedmri.deploy.topology), with real SuperLink, SuperNode
and executor processes on loopback: TLS, node authentication, enrollment, member approval,
run approval, code approval; refusals; revocation; clean stops; no outside connection."""

from __future__ import annotations

import json
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from fedmri.deploy.topology import FEDMRI, LocalFederation, Topology, fedmri, ok, wait_for

pytestmark = pytest.mark.slow
HOSPITALS = ("hospital-1", "hospital-2", "hospital-3")
TRACED = "hospital-1"  # its daemon runs under strace when strace is installed


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("federation")
    ok("synth", "--hospitals", "3", "--subjects", "2", "--seed", "5", "--out",
       str(root / "data"))
    with LocalFederation(root, root / "data", Topology("test-fed")) as federation:
        federation.init_server()
        federation.start_server()
        yield federation


def _events(fed: LocalFederation) -> list[dict[str, Any]]:
    runs = sorted((fed.server / "runs").glob("*/events.jsonl"))
    return [json.loads(line) for line in runs[-1].read_text().splitlines()] if runs else []


def _audit(fed: LocalFederation) -> list[dict[str, Any]]:
    return [json.loads(line) for line in ok("server", "--home", str(fed.server), "audit",
                                            "--json").splitlines()]


def _members(fed: LocalFederation, home: str, *flags: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(ok("client", "--home", str(fed.home(home)),
                                               "members", "--json", *flags))
    return rows


def test_three_hospitals_enroll_and_finish_a_secure_run(fed: LocalFederation) -> None:
    for hospital, policy in zip(HOSPITALS, ("accept-all", "accept-all", "manual"), strict=True):
        done = fed.enroll_hospital(hospital, "--member-policy", policy, "--approve-runs",
                                   "policy")
        assert done.returncode == 0, done.stderr
    # hospital-3 enrolled last: the others are announced to it, not accepted.
    assert {m["name"]: m["state"] for m in _members(fed, "hospital-3", "--offline")} == {
        "hospital-3": "accepted", "hospital-1": "announced", "hospital-2": "announced"}
    strace = shutil.which("strace")
    for hospital in HOSPITALS:
        if hospital == TRACED and strace:  # every connect() of the daemon and its children
            log = (fed.root / f"{hospital}.out").open("wb")
            fed.procs[hospital] = subprocess.Popen(
                [strace, "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect", "-o",
                 str(fed.root / "connects.txt"), *FEDMRI, "client", "--home",
                 str(fed.home(hospital)), "start"], stdout=log, stderr=subprocess.STDOUT)
        else:
            fed.start_hospital(hospital)
    fed.wait_online(3)
    executors = {h: json.loads((fed.home(h) / "status.json").read_text())["executor_pid"]
                 for h in HOSPITALS}

    fed.run("--rounds", "2", "--size", "32", "--local-epochs", "1", "--stage-timeout", "30")
    # Round 1: hospital-3 refuses a round with members it has not accepted; the others go on.
    failed = wait_for("hospital-3's refusal", lambda: [
        e for e in _events(fed) if e["event"] == "hospital_failed"], 180)
    assert "hospital-1" in failed[0]["reason"] and "pinned" in failed[0]["reason"]
    # Its operator compares fingerprints with the others (by phone) and accepts them.
    for other in HOSPITALS[:2]:
        fp = next(m["fingerprint"] for m in _members(fed, other, "--offline")
                  if m["name"] == other)
        ok("client", "--home", str(fed.home("hospital-3")), "accept", other, fp)

    status = fed.wait_run(timeout_s=400)
    rounds = {e["round"]: e for e in _events(fed) if e["event"] == "round_done"}
    assert rounds[1]["hospitals"] == 2 and rounds[2]["hospitals"] == 3, rounds
    assert status["state"] == "finished" and status["secure"] is True
    ok("run", "--home", str(fed.server), "fetch-model", "--out", str(fed.root / "model.pt"))
    assert (fed.root / "model.pt").stat().st_size > 0
    actions = [(a["action"], a["outcome"]) for a in _audit(fed)]
    assert actions.count(("enroll", "ok")) == 3 and ("run_start", "ok") in actions
    wait_for("the round results in the audit log", lambda: ("run_done", "ok") in [
        (a["action"], a["outcome"]) for a in _audit(fed)], 10)
    seen = json.loads(ok("client", "--home", str(fed.home("hospital-1")), "runs", "--json"))
    assert [(r["state"], r["approved_by"], r["secure"], r["participants"]) for r in seen] == [
        ("approved", "policy", True, list(HOSPITALS))]
    # One warm executor per hospital served every message (per round a train and an unmask
    # at least, and the final evaluation).
    for hospital, pid in executors.items():
        assert json.loads((fed.home(hospital) / "status.json").read_text())[
            "executor_pid"] == pid
        served = (fed.home(hospital) / "logs" / "executor.log").read_text()
        assert served.count("event=task_done") >= 5, hospital


def test_hospitals_refuse_runs_they_did_not_approve(fed: LocalFederation) -> None:
    # hospital-1 and -2 allow plain FedAvg; -2's operator now approves runs by hand;
    # hospital-3 keeps the default policy: secure aggregation required.
    for hospital, mode in (("hospital-1", "policy"), ("hospital-2", "manual")):
        policy = fed.home(hospital) / "policy.toml"
        policy.write_text(policy.read_text().replace('approve = "policy"', f'approve = "{mode}"')
                          .replace("require-secure = true", "require-secure = false"))
    run_id = fed.run("--no-secure", "--rounds", "1", "--size", "32", "--local-epochs", "1")
    status = fed.wait_run(timeout_s=300)
    assert status["state"] == "finished" and status["metrics"][0]["hospitals"] == 1
    problems = " ".join(status["problems"])
    assert f"hospital-2 does not take part in run {run_id}: waiting for its operator" \
        in problems
    assert "hospital-3 does not take part" in problems and "requires secure" in problems
    pending = json.loads(ok("client", "--home", str(fed.home("hospital-2")), "runs", "--json"))
    run = next(r for r in pending if r["run"] == run_id)
    assert (run["state"], run["secure"], run["rounds"]) == ("pending", False, 1)
    ok("client", "--home", str(fed.home("hospital-2")), "approve", run_id)
    approved = json.loads(ok("client", "--home", str(fed.home("hospital-2")), "runs",
                             "--json"))
    assert next(r for r in approved if r["run"] == run_id)["approved_by"] == "operator"


def test_a_bundle_with_foreign_code_is_refused(fed: LocalFederation) -> None:
    from fedmri.common.config import RunConfig
    from fedmri.proto.run_config import ServerSettings
    from fedmri.server import superlink
    from fedmri.server.flower_app import FlowerApp, write_flower_app
    from fedmri.server.home import CoordinatorHome

    out = fed.root / "foreign"
    settings = ServerSettings(out_dir=out, min_nodes=3, node_wait_s=60)
    app = out / "app"
    write_flower_app(app, FlowerApp("fedmri.server.app:app", "fedmri_app:app", {
        **RunConfig(rounds=1, size=32, local_epochs=1, secure=False).to_dict(),
        **settings.to_run_config()}))
    (app / "fedmri_app.py").write_text("import os\napp = os.system('touch /tmp/pwned')\n")
    superlink.flwr(CoordinatorHome.at(fed.server), "run", str(app), "fedmri", cwd=out)
    wait_for("the foreign run to end", lambda: (out / "events.jsonl").exists() and any(
        '"done"' in line or '"failed"' in line
        for line in (out / "events.jsonl").read_text().splitlines()), 180)
    reasons = [json.loads(line).get("reason", "") for line in
               (out / "events.jsonl").read_text().splitlines()]
    refusals = [r for r in reasons if "refused by the hospital" in r]
    assert len(refusals) >= 3 and all("'fedmri_app:app'" in r for r in refusals)
    for hospital in HOSPITALS:
        assert "event=run_refused" in (fed.home(hospital) / "logs" / "executor.log").read_text()


def test_enrollment_refusals(fed: LocalFederation) -> None:
    data = fed.data / "hospital-1"
    wrong = fed.enroll_hospital("hospital-9", home="wrong-ca", data=data,
                                fingerprint="AAAA-BBBB-CCCC-DDDD-EEEE-FFFF")
    assert wrong.returncode == 1 and "no CA with fingerprint AAAA-BBBB" in wrong.stderr
    assert not (fed.root / "wrong-ca" / "node.key").exists()  # nothing made, nothing sent
    unknown = fed.enroll_hospital("hospital-9", home="unknown", data=data,
                                  token="made-up-token")
    assert unknown.returncode == 1 and "unknown enrollment token" in unknown.stderr
    expiring = fed.token("hospital-9", "--expires", "1s")
    time.sleep(1.5)
    expired = fed.enroll_hospital("hospital-9", home="expired", data=data, token=expiring)
    assert expired.returncode == 1 and "expired" in expired.stderr
    taken = fed.enroll_hospital("hospital-1", home="taken")
    assert taken.returncode == 1 and "already enrolled" in taken.stderr
    for_other = fed.enroll_hospital("hospital-9", home="for-other", data=data,
                                    token=fed.token("hospital-8"))
    assert for_other.returncode == 1 and "issued for 'hospital-8'" in for_other.stderr
    missing = fedmri("client", "--home", str(fed.root / "missing"), "init", "--coordinator",
                     fed.enroll, "--name", "hospital-9", "--ca-fingerprint", fed.fingerprint,
                     "--data", str(data))
    assert missing.returncode == 2 and "--token" in missing.stderr
    details = " ".join(a["detail"] for a in _audit(fed) if a["outcome"] != "ok")
    for reason in ("unknown enrollment token", "expired", "already enrolled", "issued for"):
        assert reason in details
    # No refused name got in.
    assert sorted(m["name"] for m in _members(fed, "hospital-1")) == list(HOSPITALS)


def test_a_reused_token_is_refused(fed: LocalFederation) -> None:
    token = fed.token("hospital-7")
    data = fed.data / "hospital-1"
    assert fed.enroll_hospital("hospital-7", home="h7", token=token, data=data).returncode == 0
    again = fed.enroll_hospital("hospital-7", home="h7-again", token=token, data=data)
    assert again.returncode == 1 and "already used" in again.stderr
    ok("server", "--home", str(fed.server), "revoke", "hospital-7")


def test_a_revoked_node_key_cannot_connect(fed: LocalFederation) -> None:
    assert fed.enroll_hospital("hospital-6", home="rogue",
                               data=fed.data / "hospital-1").returncode == 0
    ok("server", "--home", str(fed.server), "revoke", "hospital-6")  # its key is unregistered
    fed.start_hospital("hospital-6", home="rogue")
    log = fed.home("rogue") / "logs" / "supernode.log"
    wait_for("the SuperLink to refuse the revoked node", lambda: log.exists() and
             "Failed to activate" in log.read_text(), 60)
    check = fedmri("client", "--home", str(fed.home("rogue")), "check", "--json")
    report = json.loads(check.stdout)
    assert check.returncode == 1 and report["enrolled"] is False
    assert any("not an enrolled hospital" in p for p in report["problems"])
    # The refused node never got a task: nothing asked for its data.
    executor_log = fed.home("rogue") / "logs" / "executor.log"
    assert "event=task_done" not in (executor_log.read_text() if executor_log.exists() else "")
    status = fed.status()
    assert {h["name"]: h["revoked"] is not None for h in status["hospitals"]}["hospital-6"]
    # The others dropped it from their member lists.
    assert "hospital-6" not in {m["name"] for m in _members(fed, "hospital-1")}


def test_keys_are_private_and_no_secret_reaches_a_log(fed: LocalFederation) -> None:
    keys = [fed.server / "tls" / "ca.key", fed.server / "tls" / "server.key"]
    for hospital in HOSPITALS:
        keys += [fed.home(hospital) / "node.key", fed.home(hospital) / "identity.pem",
                 fed.home(hospital) / "executor.secret"]
    for private in [*keys, fed.server / "registry.db"]:
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    for home in [fed.server, *(fed.home(h) for h in HOSPITALS)]:
        assert stat.S_IMODE(home.stat().st_mode) == 0o700, home
    secrets = [t.encode() for t in fed.tokens]
    for key in keys:
        body = b"".join(line for line in key.read_bytes().splitlines() if b"-----" not in line)
        secrets.append(body[len(body) // 2:len(body) // 2 + 24])  # past fixed headers
    logs = [*fed.root.glob("*.out"), *fed.root.glob("*/logs/*.log"),
            fed.server / "registry.db"]
    for blob in [json.dumps(_audit(fed)).encode(), *(p.read_bytes() for p in logs)]:
        for secret in secrets:
            assert secret not in blob


def test_a_hospital_connects_to_nothing_but_loopback(fed: LocalFederation) -> None:
    trace = fed.root / "connects.txt"
    if not trace.exists():
        pytest.skip("strace is not installed: the daemon's connections were not traced")
    calls = [line for line in trace.read_text().splitlines()
             if "connect(" in line and "sa_family=" in line]
    assert any('inet_addr("127.0.0.1")' in c for c in calls)  # the trace saw its traffic
    loopback = re.compile(r'inet_addr\("127\.|inet_pton\(AF_INET6, "(::1|::ffff:127\.)')
    for call in calls:
        family = re.search(r"sa_family=(AF_\w+)", call).group(1)  # type: ignore[union-attr]
        if family in ("AF_INET", "AF_INET6"):
            assert loopback.search(call), call
        else:
            assert family in ("AF_UNIX", "AF_NETLINK", "AF_UNSPEC"), call


def test_sigterm_stops_every_daemon_and_what_it_started(fed: LocalFederation) -> None:
    traced = psutil.Process(fed.procs[TRACED].pid)
    if "strace" in traced.name():  # the signal goes to the daemon, strace exits with it
        traced.children()[0].send_signal(signal.SIGTERM)
    for name in list(fed.procs):
        assert fed.stop(name) == 0, name
    wait_for("no Flower process left", lambda: not [
        p for p in psutil.process_iter(["cmdline"])
        if str(fed.root) in " ".join(p.info["cmdline"] or [])], 20)
    assert not (fed.server / "status.json").exists()
