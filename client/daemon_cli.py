"""`fedmri client init|check|start|status|members|accept`: the hospital's commands.

Every command takes `--home DIR` (default ~/.fedmri/client): keys, config, member list and
state (fedmri.client.home).
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmri.client.home import MEMBER_POLICIES, HospitalHome, HospitalSettings
from fedmri.client.run_approval import RunPolicy
from fedmri.common.cli import home_command, report_errors


@dataclass(frozen=True)
class InitOptions:
    threads: int = 0
    tp: int = 1
    member_policy: str = "manual"
    policy: RunPolicy = RunPolicy()
    executor: bool = True


def _enrolment(args: argparse.Namespace) -> tuple[str, str, str, str]:
    """(coordinator, token, CA fingerprint, name) from the flags or the ticket."""
    from fedmri.proto.ticket import Ticket

    ticket = Ticket.read(args.ticket) if args.ticket else None
    if ticket and args.ca_fingerprint and args.ca_fingerprint != ticket.ca_fingerprint:
        raise ValueError(f"the ticket's CA fingerprint {ticket.ca_fingerprint} is not the one "
                         f"you were given ({args.ca_fingerprint}): do not use this ticket")
    values = (args.coordinator or (ticket and ticket.coordinator),
              args.token or (ticket and ticket.token),
              args.ca_fingerprint or (ticket and ticket.ca_fingerprint),
              args.name or (ticket and ticket.hospital))
    missing = [flag for flag, v in zip(("--coordinator", "--token", "--ca-fingerprint",
                                        "--name"), values, strict=True) if not v]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (give them or --ticket FILE)")
    return values  # type: ignore[return-value]


def init(home: HospitalHome, coordinator: str, token: str, ca_fingerprint: str, name: str,
         data: Path, opts: InitOptions, force: bool) -> list[str]:
    """Make this hospital's keys, enroll, store the CA, the member list and the config."""
    from fedmri.client import members
    from fedmri.client.enroll import enroll, fetch_ca, make_node_key, split_address
    from fedmri.common.checkpoint import atomic_write
    from fedmri.common.identity import create_identity

    if home.config.exists() and not force:
        raise FileExistsError(f"{home.root} already holds an enrolled hospital (client.toml); "
                              "--force makes new keys and enrolls again (with a new token)")
    if not data.is_dir():
        raise FileNotFoundError(f"the data folder {data} does not exist")
    ca_pem = fetch_ca(coordinator, ca_fingerprint)  # before any key is made or sent
    home.root.mkdir(parents=True, exist_ok=True)
    home.root.chmod(0o700)
    node_public = make_node_key(home.node_key, home.node_pub)
    identity_public = create_identity(home.identity_key)
    done = enroll(coordinator, ca_pem, token, name, node_public, identity_public)
    if done.members.get(name) != identity_public:
        raise RuntimeError("the coordinator's member list does not hold this hospital's "
                           "identity key as sent; do not use this coordinator")
    atomic_write(home.ca_cert, lambda fh: fh.write(ca_pem), mode=0o644)
    host, _ = split_address(coordinator)
    settings = HospitalSettings(hospital=name, federation=done.federation,
                                superlink=f"{host}:{done.fleet_port}", enrollment=coordinator,
                                data=data.resolve(), threads=opts.threads, tp=opts.tp,
                                member_policy=opts.member_policy, executor=opts.executor)
    home.write_config(settings)
    from fedmri.common.identity import save_pinned

    save_pinned(home.members, {name: identity_public})
    if force or not home.policy.exists():
        opts.policy.write(home.policy)
    home.runs.mkdir(exist_ok=True)
    return members.update(home, settings, done.members)


def _reachable(address: str) -> str | None:
    from fedmri.client.enroll import EnrollmentError, split_address

    try:
        host, port = split_address(address)
        with socket.create_connection((host, port), timeout=5):
            return None
    except (OSError, EnrollmentError) as err:
        return f"{address}: {err}"


def check(home: HospitalHome) -> dict[str, Any]:
    """Health: data, kernels, GPUs, certificate, coordinator, enrollment. `healthy` is the
    exit code's answer."""
    problems: list[str] = []
    report: dict[str, Any] = {"home": str(home.root)}
    try:
        settings = home.require()
    except (FileNotFoundError, ValueError) as err:
        return {**report, "healthy": False, "problems": [str(err)]}
    report["hospital"] = settings.hospital
    from fedmri.client.dicom import scan

    if not settings.data.is_dir():
        problems.append(f"data folder {settings.data} is missing or not a folder")
        series: list[Any] = []
    else:
        try:
            series = scan(settings.data)
        except OSError as err:
            problems.append(f"data folder {settings.data} cannot be read: {err}")
            series = []
    accepted = [s for s in series if s.status == "accepted"]
    report["data"] = {"folder": str(settings.data), "accepted": len(accepted),
                      "rejected": [{"path": str(s.path), "reason": s.reason}
                                   for s in series if s.status != "accepted"]}
    if settings.data.is_dir() and not accepted:
        problems.append(f"no usable MR series in {settings.data} (see `fedmri data scan`)")
    report["kernels"] = _kernels(problems)
    from fedmri.common.tls import not_valid_after

    try:
        expires = not_valid_after(home.ca_cert.read_bytes())
        days = (expires.timestamp() - time.time()) / 86400
        report["ca"] = {"expires": expires.isoformat(), "days_left": round(days, 1)}
        if days < 30:
            problems.append(f"the coordinator's CA expires in {days:.0f} days ({expires})")
    except (OSError, ValueError) as err:
        problems.append(f"cannot read the CA certificate {home.ca_cert}: {err}")
    for what, address in (("superlink", settings.superlink),
                          ("enrollment", settings.enrollment)):
        error = _reachable(address)
        report[f"{what}_reachable"] = error is None
        if error:
            problems.append(f"coordinator {what} unreachable: {error}")
    report["enrolled"] = _enrolled(home, settings, problems)
    return {**report, "healthy": not problems, "problems": problems}


def _kernels(problems: list[str]) -> dict[str, Any]:
    try:
        from fedmri.kernels.cli import info

        kernels = info()
    except Exception as err:  # a broken build must show in the report, not crash it
        problems.append(f"kernels: {err}")
        return {}
    if not kernels["backends"]["cpu"]["compiled"]:
        problems.append("the compiled convolution is missing: run `fedmri kernels build`")
    import torch

    kernels["gpus"] = torch.cuda.device_count()
    return dict(kernels)


def _enrolled(home: HospitalHome, settings: HospitalSettings, problems: list[str]) -> bool:
    from fedmri.client.enroll import EnrollmentError, fetch_members

    try:
        fetch_members(settings.enrollment, home.ca_cert.read_bytes(), settings.hospital,
                      home.identity_key)
        return True
    except (EnrollmentError, OSError, ValueError) as err:
        problems.append(f"not enrolled or not reachable: {err}")
        return False


def main(argv: list[str]) -> int:
    parser, sub = home_command("fedmri client", "The hospital daemon and its set-up.",
                               "~/.fedmri/client")
    p = sub.add_parser("init", help="make keys and enroll with the coordinator")
    p.add_argument("--ticket", type=Path, default=None,
                   help="an enrollment ticket (`fedmri server token --out`): coordinator, "
                        "token, CA fingerprint and name; the flags below override it")
    p.add_argument("--coordinator", metavar="HOST:PORT",
                   help="the coordinator's enrollment service")
    p.add_argument("--token", help="the one-time token from the coordinator")
    p.add_argument("--ca-fingerprint",
                   help="the coordinator's CA fingerprint, as it gave it to you")
    p.add_argument("--name", help="this hospital's name (as on the token)")
    p.add_argument("--data", type=Path, required=True, help="the DICOM folder (only read)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--tp", type=int, default=1, help="ranks splitting each volume")
    p.add_argument("--member-policy", choices=MEMBER_POLICIES, default="manual",
                   help="manual: new members wait for `fedmri client accept` (default)")
    p.add_argument("--approve-runs", choices=("manual", "policy"), default="manual",
                   help="manual: each run waits for `fedmri client approve` (default); "
                        "policy: runs within policy.toml's rules are joined")
    p.add_argument("--allow-plain", action="store_true",
                   help="the policy also approves runs without secure aggregation "
                        "(default: it requires it)")
    p.add_argument("--per-message-processes", action="store_true",
                   help="UNSAFE, for comparisons only: Flower's per-message processes run "
                        "whatever ClientApp code the coordinator's run bundle carries, instead "
                        "of fedmri's executor (client.toml executor = false)")
    p.add_argument("--force", action="store_true", help="new keys, enroll again")
    p = sub.add_parser("check", help="data, kernels, GPUs, certificate, coordinator")
    p.add_argument("--json", action="store_true")
    sub.add_parser("start", help="run the SuperNode (foreground)")
    p = sub.add_parser("status", help="what the daemon runs now")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("members", help="accepted and announced members")
    p.add_argument("--json", action="store_true")
    p.add_argument("--offline", action="store_true", help="do not ask the coordinator")
    p = sub.add_parser("runs", help="runs seen, approved or refused, with their config")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("approve", help="approve a run this hospital has seen")
    p.add_argument("run", help="the Flower run id (see `fedmri client runs`)")
    p = sub.add_parser("accept", help="accept an announced member")
    p.add_argument("name")
    p.add_argument("fingerprint", help="its fingerprint, as its operator told you")
    args = parser.parse_args(argv)
    if args.command == "init":  # flags or a ticket: either way a usage error, exit 2
        try:
            args.enrolment = _enrolment(args)
        except (ValueError, FileNotFoundError) as err:
            parser.error(str(err))
    home = HospitalHome.at(args.home)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return report_errors(f"fedmri client {args.command}", lambda: _dispatch(args, home))


def _dispatch(args: argparse.Namespace, home: HospitalHome) -> int:
    from fedmri.client import members

    if args.command == "init":
        enrolment: tuple[str, str, str, str] = args.enrolment
        changes = init(home, *enrolment, args.data,
                       InitOptions(args.threads, args.tp, args.member_policy,
                                   RunPolicy(approve=args.approve_runs,
                                             require_secure=not args.allow_plain),
                                   not args.per_message_processes),
                       args.force)
        print(f"enrolled {enrolment[3]} (coordinator CA {enrolment[2]}); keys and config in "
              f"{home.root}")
        for line in changes:
            print(f"  {line}")
        return 0
    if args.command == "check":
        report = check(home)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(f"{report.get('hospital', '?')}: "
                  f"{'healthy' if report['healthy'] else 'NOT healthy'}")
            for problem in report["problems"]:
                print(f"  problem: {problem}")
        return 0 if report["healthy"] else 1
    if args.command == "start":
        from fedmri.client.daemon import start

        return start(args.home)
    if args.command == "status":
        state = (json.loads(home.status_file.read_text()) if home.status_file.exists()
                 else {"state": "stopped"})
        print(json.dumps(state, indent=2) if args.json else
              f"{state.get('hospital', home.root)}: {state['state']}, "
              f"restarts {state.get('restarts', 0)}")
        return 0
    if args.command == "members":
        if not args.offline:
            from fedmri.client.daemon import Daemon

            Daemon(home).refresh_members()
        rows = members.view(home)
        if args.json:
            print(json.dumps([row.__dict__ for row in rows], indent=2))
        for row in [] if args.json else rows:
            print(f"  {row.name:<20} {row.fingerprint}  {row.state}")
        return 0
    if args.command in ("runs", "approve"):
        from fedmri.client import run_approval

        home.require()
        if args.command == "approve":
            run = run_approval.approve(home.runs, args.run, "operator")
            print(f"approved run {args.run}: model {run['model']}, {run['rounds']} rounds, "
                  f"secure {run['secure']}")
            return 0
        seen = run_approval.runs(home.runs)
        if args.json:
            print(json.dumps(seen, indent=2))
        for r in [] if args.json else seen:
            print(f"  run {r['run']}: {r['state']}  model {r['model']}, {r['rounds']} rounds, "
                  f"{r['local_epochs']} local epochs, batch {r['batch_size']}, secure "
                  f"{r['secure']}, participants {','.join(r.get('participants', [])) or '?'}"
                  + (f"\n      refused: {r['refused']}" if r.get("refused") else ""))
        return 0
    fp = members.accept(home, args.name, args.fingerprint)
    print(f"accepted {args.name} ({fp})")
    return 0
