"""The daemons' pieces without processes: registry, member list, run approval, bundle check,
fingerprints, generated code."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from fedmri.client import members, run_approval
from fedmri.client.home import HospitalHome, HospitalSettings
from fedmri.client.run_approval import RunRefused
from fedmri.common.config import RunConfig
from fedmri.common.fingerprint import fingerprint, normalize
from fedmri.common.identity import load_pinned, save_pinned
from fedmri.proto import generate
from fedmri.proto.node_config import NodeConfig
from fedmri.server.registry import EnrollmentRefused, Registry


def _keys(i: int) -> tuple[bytes, bytes]:
    return f"ecdsa-sha2-nistp384 KEY{i}".encode(), bytes([i]) * 32


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry.db")


def _enroll(registry: Registry, token: str, name: str, i: int) -> int:
    node, ident = _keys(i)
    return registry.enroll(token, name, node, ident, lambda key: 1000 + i, lambda n: None,
                           "test").node_id


def test_token_is_one_time_and_stored_only_as_a_hash(registry: Registry, tmp_path: Path
                                                      ) -> None:
    token = registry.new_token("h1", 60, "op")
    assert token.startswith("fmt_")  # never '-': a command line would take it for an option
    assert _enroll(registry, token, "h1", 1) == 1001
    assert token.encode() not in (tmp_path / "registry.db").read_bytes()
    with pytest.raises(EnrollmentRefused, match="already used"):
        _enroll(registry, token, "h1", 2)
    assert registry.members() == {"h1": bytes([1]) * 32}


@pytest.mark.parametrize(("case", "match"), [
    ("unknown", "unknown enrollment token"), ("expired", "expired"),
    ("other-name", "issued for 'h1'"), ("name-taken", "already enrolled"),
    ("key-reused", "already used by 'h1'")])
def test_refusals_are_named_and_audited(registry: Registry, case: str, match: str) -> None:
    first = registry.new_token("h1", 60, "op")
    _enroll(registry, first, "h1", 1)
    token = registry.new_token("h1" if case == "name-taken" else "h2",
                               0.01 if case == "expired" else 60, "op")
    time.sleep(0.05)
    name, key = {"unknown": ("h2", 2), "expired": ("h2", 2), "other-name": ("h2", 2),
                 "name-taken": ("h1", 2), "key-reused": ("h2", 1)}[case]
    if case == "unknown":
        token = "not-a-token"
    if case == "other-name":
        token = registry.new_token("h1", 60, "op")
    with pytest.raises(EnrollmentRefused, match=match):
        _enroll(registry, token, name, key)
    last = registry.audit_log()[-1]
    assert (last["action"], last["outcome"]) == ("enroll", "refused")
    assert match.split("'")[0] in last["detail"]


def test_failed_registration_leaves_the_token_unspent(registry: Registry) -> None:
    token = registry.new_token("h1", 60, "op")
    node, ident = _keys(1)

    def fail(key: bytes) -> int:
        raise RuntimeError("SuperLink down")

    with pytest.raises(RuntimeError):
        registry.enroll(token, "h1", node, ident, fail, lambda n: None, "t")
    assert _enroll(registry, token, "h1", 1) == 1001


def test_revoked_keys_never_enroll_again(registry: Registry) -> None:
    _enroll(registry, registry.new_token("h1", 60, "op"), "h1", 1)
    gone: list[int] = []
    registry.revoke("h1", gone.append, "op")
    assert gone == [1001] and registry.members() == {}
    with pytest.raises(EnrollmentRefused, match="already used"):
        _enroll(registry, registry.new_token("h1", 60, "op"), "h1", 1)
    assert _enroll(registry, registry.new_token("h1", 60, "op"), "h1", 3) == 1003


def test_audit_log_is_append_only(registry: Registry) -> None:
    registry.audit("op", "init", "x")
    db = sqlite3.connect(registry.path)
    for statement in ("UPDATE audit SET actor = 'mallory'", "DELETE FROM audit"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute(statement)
    assert registry.audit_log()[0]["actor"] == "op"


def _hospital(tmp_path: Path, policy: str = "manual") -> tuple[HospitalHome, HospitalSettings]:
    home = HospitalHome(tmp_path)
    settings = HospitalSettings(hospital="h1", superlink="x:1", enrollment="x:2",
                                data=tmp_path, member_policy=policy)
    save_pinned(home.members, {"h1": b"\x01" * 32})
    return home, settings


def test_announced_members_wait_for_acceptance_by_fingerprint(tmp_path: Path) -> None:
    home, settings = _hospital(tmp_path)
    offered = {"h1": b"\x01" * 32, "h2": b"\x02" * 32}
    members.update(home, settings, offered)
    assert set(members.accepted(home)) == {"h1"}
    with pytest.raises(ValueError, match="do not accept"):
        members.accept(home, "h2", fingerprint(b"\x03" * 32))
    members.accept(home, "h2", fingerprint(b"\x02" * 32).lower().replace("-", " "))
    assert load_pinned(home.members) == offered


def test_a_changed_key_is_never_taken_over_and_a_leaver_is_dropped(tmp_path: Path) -> None:
    home, settings = _hospital(tmp_path, "accept-all")
    members.update(home, settings, {"h1": b"\x01" * 32, "h2": b"\x02" * 32})
    assert set(members.accepted(home)) == {"h1", "h2"}
    changes = members.update(home, settings, {"h1": b"\x01" * 32, "h2": b"\x09" * 32,
                                              "h3": b"\x03" * 32})
    assert members.accepted(home)["h2"] == b"\x02" * 32  # even under accept-all
    assert any("another key for h2" in c for c in changes)
    assert [v.state for v in members.view(home) if v.name == "h2"] == ["accepted",
                                                                      "key-changed"]
    members.update(home, settings, {"h1": b"\x01" * 32})
    assert set(members.accepted(home)) == {"h1"}
    # Malformed entries from a lying coordinator are ignored, never fatal, never accepted.
    changes = members.update(home, settings, {"h1": b"\x01" * 32, "h4\nh1": b"\x04" * 32,
                                              "h5": b"short"})
    assert set(members.accepted(home)) == {"h1"} and sum("malformed" in c for c in changes) == 2


def test_fingerprint_is_short_and_typo_tolerant() -> None:
    fp = fingerprint(b"key")
    assert len(fp.replace("-", "")) == 24 and normalize(fp.lower().replace("-", "")) == fp
    assert fingerprint(b"key2") != fp


def test_generated_grpc_modules_match_the_proto() -> None:
    assert generate.main(["--check"]) == 0


def _node(tmp_path: Path, approve: str = "manual", **rules: object) -> NodeConfig:
    from fedmri.client.run_approval import RunPolicy

    RunPolicy(approve=approve, **rules).write(tmp_path / "policy.toml")  # type: ignore[arg-type]
    (tmp_path / "runs").mkdir(exist_ok=True)
    return NodeConfig(hospital="h1", runs_dir=tmp_path / "runs",
                      run_policy=tmp_path / "policy.toml")


def test_a_run_waits_for_its_operator_and_approval_is_bound_to_the_config(tmp_path: Path
                                                                         ) -> None:
    node = _node(tmp_path)
    cfg = RunConfig(rounds=3)
    with pytest.raises(RunRefused, match="waiting for its operator: fedmri client approve 7"):
        run_approval.gate(node, 7, cfg, participants=["h1", "h2"])
    assert [r["state"] for r in run_approval.runs(tmp_path / "runs")] == ["pending"]
    run_approval.approve(tmp_path / "runs", "7", "op")
    run_approval.gate(node, 7, cfg)
    with pytest.raises(RunRefused, match="configuration changed since it was approved"):
        run_approval.gate(node, 7, RunConfig(rounds=3, lr=1.0))
    with pytest.raises(RunRefused, match="not a Flower run id"):
        run_approval.gate(node, "../../etc", cfg)


@pytest.mark.parametrize(("cfg", "volumes", "match"), [
    (RunConfig(secure=False), None, "requires secure aggregation"),
    (RunConfig(model="segresnet"), None, "model 'segresnet' is not allowed"),
    (RunConfig(rounds=30), None, "30 rounds exceed"),
    (RunConfig(), 1, "below the policy's 2")])
def test_the_policy_refuses_runs_outside_its_rules(tmp_path: Path, cfg: RunConfig,
                                                   volumes: int | None, match: str) -> None:
    node = _node(tmp_path, "policy", models="unet", max_rounds=20, min_volumes=2)
    with pytest.raises(RunRefused, match=match):
        run_approval.gate(node, 5, cfg, volumes=volumes)
    run_approval.gate(node, 6, RunConfig(), volumes=2)  # within the rules: approved
    assert {r["run"]: r["approved_by"] for r in run_approval.runs(tmp_path / "runs")}["6"] \
        == "policy"


def _bundle(tmp_path: Path, clientapp: str = "fedmri.client.app:app",
            module: str | None = None) -> tuple[bytes, str]:
    import hashlib
    import io
    import zipfile

    from fedmri.server.flower_app import FlowerApp, write_flower_app

    write_flower_app(tmp_path / "app", FlowerApp("fedmri.server.app:app", clientapp))
    if module is not None:
        (tmp_path / "app" / "fedmri_app.py").write_text(module)
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as bundle:
        for path in sorted((tmp_path / "app").iterdir()):
            bundle.write(path, path.name)
        bundle.writestr(".info/CONTENT", "pyproject.toml,abc,1\n")
    content = data.getvalue()
    return content, hashlib.sha256(content).hexdigest()


def test_only_code_free_bundles_naming_the_installed_clientapp_run(tmp_path: Path) -> None:
    import hashlib
    import io
    import warnings
    import zipfile

    from fedmri.client.executor import bundle_problem

    content, digest = _bundle(tmp_path)
    assert bundle_problem(content, digest, digest) is None
    assert "does not match" in str(bundle_problem(content, digest, "0" * 64))
    content, digest = _bundle(tmp_path / "a", clientapp="evil:app")
    assert "names the ClientApp 'evil:app'" in str(bundle_problem(content, digest, digest))
    content, digest = _bundle(tmp_path / "b", module="import os\nos.system('id')\n")
    assert "carries code (fedmri_app.py)" in str(bundle_problem(content, digest, digest))
    content, digest = _bundle(tmp_path / "c", module='"""Doc."""\napp = None\n')
    assert bundle_problem(content, digest, digest) is None
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as bundle, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it writes
        for name in ("pyproject.toml", "pyproject.toml"):
            bundle.writestr(name, '[tool.flwr.app.components]\nclientapp = "x:app"\n')
    twice = data.getvalue()
    digest = hashlib.sha256(twice).hexdigest()
    assert "holds a file twice" in str(bundle_problem(twice, digest, digest))
    junk = hashlib.sha256(b"not a zip").hexdigest()
    assert "unreadable" in str(bundle_problem(b"not a zip", junk, junk))


@pytest.mark.usefixtures("serverapp_identity")
@pytest.mark.parametrize(("secure", "rnd", "match"), [
    (True, 1, "declared secure but this message is not"),
    (False, 3, "round 3 is outside the run's 2 rounds")])
def test_a_lying_coordinator_gets_a_refusal_not_the_weights(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secure: bool, rnd: int,
        match: str) -> None:
    import torch
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    import fedmri.client.app as client_app
    from fedmri.proto import weights, wire

    cfg = RunConfig(secure=secure, rounds=2)
    model = torch.nn.Linear(2, 2)

    class Split:
        train, val = [1, 2], [1]

    def setup(msg: Message, context: Context) -> tuple[object, ...]:
        return NodeConfig(hospital="h1"), cfg, model, Split(), 0.0

    monkeypatch.setattr(client_app, "_setup", setup)
    # A train message with no secure-aggregation records, for a run declared secure; or a
    # round beyond the run's.
    content = RecordDict({wire.CONFIG: ConfigRecord({**cfg.to_dict(), wire.ROUND: rnd}),
                          **weights.pack(model.state_dict())})
    msg = Message(content=content, dst_node_id=1, message_type="train")
    ctx = Context(run_id=42, node_id=1, node_config={}, state=RecordDict(),
                  run_config=cfg.to_dict())
    with pytest.raises(RunRefused, match=match):
        client_app.train(msg, ctx)


def test_a_revocation_while_the_superlink_is_down_is_queued(registry: Registry) -> None:
    _enroll(registry, registry.new_token("h1", 60, "op"), "h1", 1)
    registry.revoke("h1", None, "op")
    assert registry.members() == {} and registry.pending_unregisters() == [1001]
    registry.unregistered(1001)
    assert registry.pending_unregisters() == []


def test_enrollment_tickets_are_private_and_hostile_ones_refused(tmp_path: Path) -> None:
    import os

    from fedmri.proto.ticket import Ticket

    good = Ticket("hospital-1", "fmt_secret", "AAAA-BBBB", "coordinator:9095")
    path = tmp_path / "t.json"
    decoy = tmp_path / "decoy"
    decoy.write_text("keep me")
    (tmp_path / "t.json.tmp").symlink_to(decoy)  # a planted link is never written through
    good.write(path)
    assert Ticket.read(path) == good and path.stat().st_mode & 0o777 == 0o600
    assert decoy.read_text() == "keep me"
    link = tmp_path / "link.json"
    link.symlink_to(path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 4000)
    renamed = tmp_path / "renamed.json"
    renamed.write_text('{"hospital": "../x", "token": "t", "ca_fingerprint": "f", '
                       '"coordinator": "c"}')
    for bad, error in ((link, FileNotFoundError), (fifo, ValueError), (nested, ValueError),
                       (renamed, ValueError), (tmp_path / "none", FileNotFoundError)):
        with pytest.raises(error, match=str(bad.name)):
            Ticket.read(bad)


def test_a_ticket_must_match_the_fingerprint_given_by_phone(tmp_path: Path) -> None:
    import argparse

    from fedmri.client.daemon_cli import _enrolment
    from fedmri.proto.ticket import Ticket

    path = tmp_path / "t.json"
    Ticket("hospital-1", "fmt_secret", "AAAA-BBBB", "coordinator:9095").write(path)
    args = argparse.Namespace(ticket=path, coordinator=None, token=None, name=None,
                              ca_fingerprint="CCCC-DDDD")
    with pytest.raises(ValueError, match="not the one you were given"):
        _enrolment(args)
    args.ca_fingerprint = "AAAA-BBBB"
    assert _enrolment(args) == ("coordinator:9095", "fmt_secret", "AAAA-BBBB", "hospital-1")
    with pytest.raises(ValueError, match="missing --coordinator, --token"):
        _enrolment(argparse.Namespace(ticket=None, coordinator=None, token=None,
                                      name="h", ca_fingerprint="x"))


def test_the_supernode_polls_fast_only_while_a_run_is_busy() -> None:
    """fedmri.client.supernode: Flower's 3 s idle wait shortened within BUSY_S of the last
    message, its 0.5 s reply wait and its object-pull backoff always; other sleeps and time
    functions untouched."""
    from types import SimpleNamespace

    from fedmri.client import supernode

    now, slept = [1000.0], list[float]()
    clock = supernode.BusyClock(now=lambda: now[0], sleep=slept.append)
    pulled = iter([None, 42, None])
    module = SimpleNamespace(__name__="flower_loop", time=None,
                             _pull_and_store_message=lambda *a, **k: next(pulled),
                             pull_objects=lambda ids, **kwargs: kwargs)
    supernode.patch(module, clock)  # type: ignore[arg-type]
    assert module.pull_objects(["a"], pull_object_fn=print) == {
        "pull_object_fn": print, "initial_backoff": supernode.OBJECT_BACKOFF_S[0],
        "backoff_cap": supernode.OBJECT_BACKOFF_S[1],
        "max_tries_per_object": supernode.OBJECT_TRIES}
    assert module.time is clock and clock.time() > 0  # delegates what it does not change
    assert module._pull_and_store_message() is None
    module.time.sleep(supernode.FLOWER_IDLE_S)  # no run yet: Flower's own wait
    assert module._pull_and_store_message() == 42  # a message: busy from now
    module.time.sleep(supernode.FLOWER_REPLY_S)
    module.time.sleep(supernode.FLOWER_IDLE_S)
    module.time.sleep(7)
    now[0] += supernode.BUSY_S + 1  # quiet for longer than BUSY_S
    module.time.sleep(supernode.FLOWER_IDLE_S)
    assert slept == [3, supernode.REPLY_POLL_S, supernode.BUSY_POLL_S, 7, 3]
    with pytest.raises(RuntimeError, match="has no '_pull_and_store_message'"):
        supernode.patch(SimpleNamespace(__name__="changed", time=None),  # type: ignore[arg-type]
                        clock)


def test_the_supernode_patch_fits_the_installed_flower() -> None:
    """The names the patch replaces are the ones flwr's SuperNode loop uses."""
    import inspect

    from flwr.supernode import start_client_internal as loop

    source = inspect.getsource(loop.start_client_internal)
    assert "_pull_and_store_message(" in source and "time.sleep(3)" in source
    assert "pull_objects(" in inspect.getsource(loop._pull_and_store_message)
    assert "time.sleep(0.5)" in inspect.getsource(loop._push_messages)
