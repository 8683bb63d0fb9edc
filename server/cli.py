"""`fedmri server init|start|token|revoke|status|audit`: the coordinator's commands.

Every command takes `--home DIR` (default ~/.fedmri/server): its keys, config and state
(fedmri.server.home).
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmri.common.cli import home_command, report_errors
from fedmri.server.home import CoordinatorHome, CoordinatorSettings

if TYPE_CHECKING:
    from fedmri.server.registry import Registry

log = logging.getLogger("fedmri.server")


def _actor() -> str:
    try:
        return f"{getpass.getuser()}@cli"
    except (KeyError, OSError):
        return f"uid{os.getuid()}@cli"


def parse_duration(text: str) -> float:
    """'90s', '30m', '24h', '7d' (or plain seconds) -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value = float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30m, 24h or 7d") \
            from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must be positive")
    return value


def init(home: CoordinatorHome, name: str, hosts: list[str], port: int, enroll_port: int,
         bind: str, force: bool, days: int = 3650) -> str:
    """Make the CA, the server certificate and the config; the CA fingerprint."""
    from fedmri.common.tls import ca_fingerprint, make_tls_files

    if home.config.exists() and not force:
        raise FileExistsError(f"{home.root} already holds a coordinator (server.toml); "
                              "--force replaces its CA and certificates (hospitals must "
                              "enroll again)")
    home.root.mkdir(parents=True, exist_ok=True)
    home.root.chmod(0o700)
    all_hosts = tuple(dict.fromkeys([*hosts, "127.0.0.1", "localhost"]))
    files = make_tls_files(home.tls, all_hosts, days=days, ca_name=f"fedmri {name} CA",
                           keep_ca_key=True)
    settings = CoordinatorSettings(name=name, hosts=",".join(all_hosts), port=port,
                                   enroll_port=enroll_port, bind=bind)
    home.write_config(settings)
    home.write_flwr_config(settings)
    from fedmri.server.registry import Registry

    registry = Registry(home.registry)
    registry.audit(_actor(), "init", name, "ok", f"hosts {settings.hosts}")
    registry.close()
    return ca_fingerprint(files.ca_cert.read_bytes())


def _registry(home: CoordinatorHome) -> Registry:
    from fedmri.server.registry import Registry

    home.require()
    return Registry(home.registry)


def start(home: CoordinatorHome) -> int:
    """The SuperLink and the enrollment service, in the foreground until SIGTERM/Ctrl-C or
    until the SuperLink exits (then exit 1, for systemd or the container to restart us)."""
    from fedmri.common.checkpoint import save_json, write_private
    from fedmri.common.processes import (
        Supervisor,
        flower_env,
        interrupt_on_sigterm,
        wait_for_port,
    )
    from fedmri.server import superlink
    from fedmri.server.enrollment import EnrollmentService, serve
    from fedmri.server.runs import RoundAuditor

    settings = home.require()
    registry = _registry(home)
    interrupt_on_sigterm()
    service = EnrollmentService(settings, registry,
                                lambda key, name: superlink.register_node(home, key, name),
                                lambda node: superlink.unregister_node(home, node))
    grpc_server = None
    try:
        with Supervisor(home.logs) as sup:
            env = flower_env({"FLWR_HOME": str(home.flwr_home)})
            write_private(home.superexec_secret, secrets.token_bytes(32))
            link = sup.start("superlink", superlink.superlink_argv(home, settings), env=env)
            wait_for_port(settings.port, 60, link, "flower-superlink")
            # Interrupted runs are stopped and submitted again before the ServerApp executor
            # starts, so it never claims an old run beside its resumed copy.
            from fedmri.server.runs import resume_interrupted

            for run in resume_interrupted(home, registry):
                log.info("event=run_resumed run=%s", run)
            executor = sup.start("superexec", superlink.superexec_argv(home, settings),
                                 env=env)
            _unregister_revoked(home, registry)
            grpc_server = serve(service, settings.bind, settings.enroll_port,
                                (home.tls / "server.pem").read_bytes(),
                                (home.tls / "server.key").read_bytes())
            save_json(home.status_file, {"pid": os.getpid(), "started": time.time(),
                                         "port": settings.port,
                                         "enroll_port": settings.enroll_port})
            log.info("event=server_started name=%s port=%d enroll_port=%d", settings.name,
                     settings.port, settings.enroll_port)
            print(f"fedmri server {settings.name}: SuperLink on port {settings.port}, "
                  f"enrollment on port {settings.enroll_port}", flush=True)
            auditor = RoundAuditor(home)
            while link.poll() is None and executor.poll() is None:
                auditor.poll(registry)
                time.sleep(0.5)
            print(f"fedmri server: the SuperLink (code {link.returncode}) or its ServerApp "
                  f"executor (code {executor.returncode}) exited; see {home.logs}",
                  file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("fedmri server: stopped", file=sys.stderr)
        return 0
    finally:
        if grpc_server is not None:
            grpc_server.stop(2).wait()
        home.status_file.unlink(missing_ok=True)
        registry.close()


def _unregister_revoked(home: CoordinatorHome, registry: Registry) -> None:
    """Hospitals revoked while the SuperLink was down lose their node key now."""
    from fedmri.server import superlink

    for node_id in registry.pending_unregisters():
        try:
            superlink.unregister_node(home, node_id)
            log.info("event=node_unregistered node=%d", node_id)
        except RuntimeError as err:
            log.warning("event=node_unregister_failed node=%d error=%r", node_id, str(err))
        registry.unregistered(node_id)


def status(home: CoordinatorHome) -> dict[str, Any]:
    """Hospitals (enrolled, connected, last seen), runs, and the last errors."""
    from fedmri.server import superlink

    settings = home.require()
    registry = _registry(home)
    running = home.status_file.exists()
    nodes: dict[int, dict[str, Any]] = {}
    errors = []
    if running:
        try:
            nodes = {int(n.get("node-id", n.get("node_id", -1))): n
                     for n in superlink.list_nodes(home)}
        except (RuntimeError, ValueError, OSError) as err:
            errors.append(str(err))
    hospitals = []
    for h in registry.hospitals():
        node = nodes.get(h.node_id, {})
        hospitals.append({"name": h.name, "node_id": h.node_id, "enrolled": h.enrolled,
                          "revoked": h.revoked, "status": node.get("status", "unknown"),
                          "last_seen": node.get("online-at") if node.get("status") == "online"
                          else node.get("offline-at"),
                          "node": node})
    audit = registry.audit_log(200)
    registry.close()
    errors += [f"{a['action']} {a['subject']}: {a['detail']}" for a in audit
               if a["outcome"] != "ok"][-5:]
    from fedmri.server.runs import run_summaries

    return {"federation": settings.name, "running": running, "port": settings.port,
            "enroll_port": settings.enroll_port, "hospitals": hospitals,
            "runs": run_summaries(home), "last_errors": errors}


def _print_status(report: dict[str, Any]) -> None:
    state = "running" if report["running"] else "stopped"
    print(f"federation {report['federation']}: {state} (SuperLink port {report['port']}, "
          f"enrollment port {report['enroll_port']})")
    for h in report["hospitals"]:
        state = "revoked" if h["revoked"] else h["status"]
        print(f"  {h['name']:<20} node {h['node_id']}  {state}  last seen {h['last_seen']}")
    for run in report["runs"][-5:]:
        print(f"  run {run['run']}: {run['state']}, round {run['round']}/{run['rounds']}")
    for err in report["last_errors"]:
        print(f"  error: {err}")


def main(argv: list[str]) -> int:
    parser, sub = home_command("fedmri server", "The coordinator: CA, SuperLink, enrollment.",
                               "~/.fedmri/server")
    p = sub.add_parser("init", help="make the CA, the server certificate and the config")
    p.add_argument("--name", required=True, help="the federation's name")
    p.add_argument("--host", action="append", required=True, dest="hosts",
                   help="a name or address hospitals reach this server by (repeat for more)")
    p.add_argument("--port", type=int, default=9092, help="SuperLink port")
    p.add_argument("--enroll-port", type=int, default=9095, help="enrollment service port")
    p.add_argument("--bind", default="0.0.0.0", help="address to listen on")
    p.add_argument("--force", action="store_true", help="replace an existing coordinator")
    sub.add_parser("start", help="run the SuperLink and the enrollment service (foreground)")
    p = sub.add_parser("token", help="a one-time enrollment token for a hospital")
    p.add_argument("hospital")
    p.add_argument("--expires", type=parse_duration, default=parse_duration("24h"),
                   help="how long the token is valid (e.g. 30m, 24h, 7d; default 24h)")
    p.add_argument("--out", type=Path, default=None,
                   help="also write an enrollment ticket (token, CA fingerprint, coordinator; "
                        "0600) for `fedmri client init --ticket FILE`")
    p = sub.add_parser("revoke", help="remove a hospital: its node key and membership")
    p.add_argument("hospital")
    p = sub.add_parser("status", help="hospitals, runs, last errors")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("audit", help="the audit log")
    p.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    home = CoordinatorHome.at(args.home)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return report_errors(f"fedmri server {args.command}", lambda: _dispatch(args, home))


def _dispatch(args: argparse.Namespace, home: CoordinatorHome) -> int:
    from fedmri.server.registry import EnrollmentRefused

    if args.command == "init":
        from fedmri.proto.names import check_hospital_name

        check_hospital_name(args.name)
        fp = init(home, args.name, args.hosts, args.port, args.enroll_port, args.bind,
                  args.force)
        print(f"coordinator {args.name} in {home.root}\nCA fingerprint: {fp}")
        return 0
    if args.command == "start":
        return start(home)
    if args.command == "token":
        from fedmri.common.tls import ca_fingerprint
        from fedmri.proto.names import check_hospital_name

        settings = home.require()
        registry = _registry(home)
        token = registry.new_token(check_hospital_name(args.hospital), args.expires, _actor())
        registry.close()
        fp = ca_fingerprint((home.tls / "ca.pem").read_bytes())
        enroll = f"{settings.hosts.split(',')[0]}:{settings.enroll_port}"
        if args.out:  # the token goes into the file only, not into a log
            from fedmri.proto.ticket import Ticket

            Ticket(args.hospital, token, fp, enroll).write(args.out)
            given = f"ticket:         {args.out} (hand it over privately; it holds the token)"
            at_hospital = f"--ticket {args.out.name}"
        else:
            given = f"token:          {token}\ncoordinator:    {enroll}"
            at_hospital = (f"--coordinator {enroll} --name {args.hospital} --token {token} "
                           f"--ca-fingerprint {fp}")
        print(f"{given}\nCA fingerprint: {fp}\nvalid for {args.expires / 3600:.1f} h, once. "
              f"At the hospital:\n  fedmri client init {at_hospital} --data DIR")
        return 0
    if args.command == "revoke":
        from fedmri.server import superlink

        registry = _registry(home)
        running = home.status_file.exists()  # else `server start` unregisters it
        try:
            registry.revoke(args.hospital, (lambda node: superlink.unregister_node(home, node))
                            if running else None, _actor())
        except EnrollmentRefused as err:
            raise ValueError(str(err)) from None
        registry.close()
        print(f"revoked {args.hospital}: its node key is unregistered and it is no longer a "
              "member; hospitals see the change in `fedmri client members`")
        return 0
    if args.command == "status":
        report = status(home)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            _print_status(report)
        return 0
    registry = _registry(home)
    entries = registry.audit_log(10_000)
    registry.close()
    for entry in entries:
        print(json.dumps(entry) if args.json else
              f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(entry['ts']))} "
              f"{entry['actor']} {entry['action']} {entry['subject']} {entry['outcome']} "
              f"{entry['detail']}")
    return 0
