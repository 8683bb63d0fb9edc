"""deploy/compose.yaml, generated from the federation's topology (fedmri.deploy.topology).

    python -m fedmri.deploy.compose [--hospitals N] > deploy/compose.yaml
    python -m fedmri.deploy.compose --check deploy/compose.yaml   # CI: still what we generate

The services run the same `Topology` command lines as `fedmri simulate` (only the paths and the
coordinator's host name differ), so the simulate tests run what the Compose file runs:
- `coordinator-init` (once): `fedmri server init`;
- `<hospital>-ticket` (once): `fedmri server token --out`, into that hospital's own ticket
  volume;
- `coordinator`: `fedmri server start`, on every hospital's network;
- `<hospital>-data` and `test-site-data` (once): that site's synthetic cohort (`fedmri synth
  --site`), in the site's own data volume;
- `<hospital>`: `fedmri client init --ticket` on first start (its keys are made in its own
  volume and never leave it), then `fedmri client start`; its network is internal (no
  route out) and reaches only the coordinator; its data is mounted read-only;
- `run` (once): `fedmri run start --wait`, then `fedmri run report` into the `results` volume,
  scored on the held-back test site. It shares the coordinator's network namespace: the
  `flwr` commands fedmri runs reach the SuperLink at the coordinator's 127.0.0.1 (its
  flwr config). Flower's Control API is not authenticated and answers on the SuperLink's
  public port too: see docs/deployment.md, Limits.
Every container runs as the image's non-root user with a read-only root file system, no
capabilities and no privilege escalation.
`docker compose up` runs one secure federated run; `docker compose down -v` removes every
container, network and volume it made.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from fedmri.deploy.topology import Hospital, Topology

HOME = "/state"  # every service's --home, its own volume (the image's working folder)
TICKETS = "/tickets"
DATA = "/data"
RESULTS = "/results"
SUBJECTS = 6
SEED = 0
RUN_FLAGS = ("--rounds", "3", "--local-epochs", "1", "--size", "64", "--node-wait", "900",
             "--stage-timeout", "300", "--wait-timeout", "21600")
IMAGE = "fedmri:cpu"
DONE = {"condition": "service_completed_successfully"}


def compose_topology(hospitals: int = 3) -> Topology:
    return Topology("compose", tuple(Hospital(f"hospital-{i}") for i in range(1, hospitals + 1)),
                    RUN_FLAGS)


def _fedmri(argv: list[str]) -> str:
    return shlex.join(["fedmri", *argv])


def _once(argv: list[str], done_file: str) -> str:
    """A set-up step that runs only where it has not run before (restarts, `up` again)."""
    return f"set -e; test -f {done_file} || {_fedmri(argv)}"


HARDENING = {"read_only": True, "tmpfs": ["/tmp"], "cap_drop": ["ALL"],
             "security_opt": ["no-new-privileges:true"]}


def _service(script: str, volumes: list[str], **extra: Any) -> dict[str, Any]:
    return {"image": IMAGE, "entrypoint": ["sh", "-c"], "command": [script],
            "volumes": volumes, **HARDENING, **extra}


def compose(topo: Topology) -> dict[str, Any]:
    names = [h.name for h in topo.hospitals]
    coordinator_home = f"coordinator-home:{HOME}"
    services: dict[str, Any] = {
        "coordinator-init": _service(
            _once(topo.server_init(HOME, "coordinator", 9092, 9095, "0.0.0.0"),
                  f"{HOME}/server.toml"), [coordinator_home], network_mode="none"),
        "coordinator": {
            "image": IMAGE, "command": topo.server_start(HOME),
            "environment": {"FEDMRI_ROLE": "coordinator"}, "volumes": [coordinator_home],
            "networks": [f"{n}-net" for n in names],
            "depends_on": {"coordinator-init": DONE},
            "restart": "unless-stopped", "stop_grace_period": "60s", **HARDENING}}
    for n in names:  # the ticket goes into the hospital's own volume, nowhere else
        services[f"{n}-ticket"] = _service(
            _once(topo.token(HOME, n, f"{TICKETS}/ticket.json"), f"{TICKETS}/ticket.json"),
            [coordinator_home, f"ticket-{n}:{TICKETS}"], network_mode="none",
            depends_on={"coordinator-init": DONE})
    for site in [*names, "test-site"]:
        synth = ["synth", "--hospitals", str(len(names)), "--subjects", str(SUBJECTS),
                 "--seed", str(SEED), "--site", site, "--out", DATA, "--quiet"]
        services[f"{site}-data"] = _service(_once(synth, f"{DATA}/cohort.json"),
                                            [f"data-{site}:{DATA}"], network_mode="none")
    for hospital in topo.hospitals:
        n = hospital.name
        enroll = topo.client_init(HOME, hospital, f"{TICKETS}/ticket.json", f"{DATA}/{n}")
        services[n] = _service(
            f"{_once(enroll, f'{HOME}/client.toml')}; exec {_fedmri(topo.client_start(HOME))}",
            [f"{n}-home:{HOME}", f"ticket-{n}:{TICKETS}:ro", f"data-{n}:{DATA}:ro"],
            environment={"FEDMRI_ROLE": "hospital"}, networks=[f"{n}-net"],
            depends_on={"coordinator": {"condition": "service_healthy"},
                        f"{n}-ticket": DONE, f"{n}-data": DONE},
            restart="unless-stopped", stop_grace_period="60s")
    services["run"] = _service(
        f"set -e; {_fedmri(topo.run_start(HOME))}; "
        f"{_fedmri(topo.run_report(HOME, RESULTS, f'{DATA}/test-site'))}",
        [coordinator_home, f"results:{RESULTS}", f"data-test-site:{DATA}:ro"],
        network_mode="service:coordinator",
        depends_on={"coordinator": {"condition": "service_healthy"}, "test-site-data": DONE,
                    **{n: {"condition": "service_started"} for n in names}})
    return {
        "name": "fedmri",
        "services": services,
        # internal: no route out of a hospital's network; only the coordinator is on it.
        "networks": {f"{n}-net": {"internal": True} for n in names},
        "volumes": {v: {} for v in ["coordinator-home", "results", "data-test-site",
                                    *[f"{p}-{n}" for n in names
                                      for p in ("ticket", "data")],
                                    *[f"{n}-home" for n in names]]},
    }


HEADER = ("# Generated by `python -m fedmri.deploy.compose` from fedmri.deploy.topology (the\n"
          "# commands `fedmri simulate` runs as processes); do not edit by hand.\n"
          "# docker build -f deploy/docker/Dockerfile -t fedmri:cpu .\n"
          "# docker compose -f deploy/compose.yaml up; docker compose -f deploy/compose.yaml "
          "down -v\n")


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # every service spelled out, no &id001 anchors


def render(topo: Topology) -> str:
    return HEADER + yaml.dump(compose(topo), Dumper=_Dumper, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedmri.deploy.compose",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--check", type=Path, default=None,
                        help="exit 1 unless this file is what would be generated")
    args = parser.parse_args(argv)
    text = render(compose_topology(args.hospitals))
    if args.check is None:
        sys.stdout.write(text)
        return 0
    if args.check.read_text() != text:
        print(f"{args.check} is out of date: regenerate it with python -m "
              f"fedmri.deploy.compose > {args.check}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
