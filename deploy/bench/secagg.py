"""`fedmri bench secagg`: the cost of secure aggregation against plain FedAvg, in one run.

The same cohort (N clients, M float32 parameters each, weights E) goes through every variant,
each a real Flower deployment on 127.0.0.1 (one SuperLink, N SuperNodes, TLS, `flwr run`), one
variant after another. Per variant (means over R rounds):

- seconds_per_round: wall time of a round in the ServerApp (first message out to aggregate);
- client_cpu_s: user+sys CPU of all ClientApp processes of the run (Flower starts one per
  message; each records its own getrusage at exit), divided by N * R;
- server_cpu_s: the ServerApp process's user+sys CPU over a round;
- upload_bytes_per_client: serialized size of the content of every reply of a round (all
  protocol stages: Flower's deflated objects), divided by N;
- server_peak_mb: the ServerApp process's ru_maxrss at the end;
- max_abs_error: max over rounds and coordinates of |aggregate - exact weighted mean| (float64).

Ratios: upload ours/plain, overhead (ours - plain seconds) / (flower - plain seconds), error
ours/flower. A variant whose components are not installed yet is skipped with its reason.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedmri.common.checkpoint import save_json
from fedmri.common.processes import flower_env
from fedmri.deploy.bench.measure import mean
from fedmri.deploy.bench.vectors import STD, BenchCohort, parse_examples
from fedmri.deploy.deployment import Deployment, FlowerApp, run_deployment, run_guarded
from fedmri.deploy.enrollment import enroll_hospitals, enrolled_node
from fedmri.proto import files
from fedmri.proto.run_config import ServerSettings

# name: (ServerApp component, ClientApp component); every pair follows the same run-config,
# node-config and bench.json contract (fedmri.deploy.bench.server_apps, .client_apps).
_APPS = "fedmri.deploy.bench.server_apps", "fedmri.deploy.bench.client_apps"
VARIANTS: dict[str, tuple[str, str]] = {
    "plain": (f"{_APPS[0]}:plain_app", f"{_APPS[1]}:plain_app"),
    "flower": (f"{_APPS[0]}:flower_secaggplus_app", f"{_APPS[1]}:flower_secaggplus_app"),
    "ours": (f"{_APPS[0]}:secure_app", f"{_APPS[1]}:secure_app"),
}

_CHECK = """
import importlib, json, sys
missing = {}
for ref in sys.argv[1:]:
    module, _, attr = ref.partition(":")
    try:
        getattr(importlib.import_module(module), attr)
    except Exception as err:
        missing[ref] = f"{type(err).__name__}: {err}"
print(json.dumps(missing))
"""


@dataclass
class BenchOptions:
    out: Path
    variants: tuple[str, ...] = ("plain", "flower", "ours")
    tls: bool = True
    timeout_s: float = 1800.0
    grid_poll_s: float = 0.2


def missing_components(refs: list[str]) -> dict[str, str]:
    """The 'module:attribute' refs that do not load, with why; checked in a fresh interpreter
    (deploy starts the server's and the client's code as processes, it does not import it)."""
    done = subprocess.run([sys.executable, "-c", _CHECK, *refs], capture_output=True,
                          text=True, env=flower_env(), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"could not check the bench components:\n{done.stderr[-2000:]}")
    result: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def summarize(bench: dict[str, Any], cpu_records: list[dict[str, Any]], cohort: BenchCohort,
              deployment_s: float) -> dict[str, Any]:
    """One variant's numbers from its ServerApp's bench.json and its ClientApps' CPU files."""
    rounds = bench["rounds"]
    per_client_round = cohort.clients * cohort.rounds
    return {
        "seconds_per_round": mean([r["seconds"] for r in rounds]),
        "client_cpu_s": sum(c["cpu_s"] for c in cpu_records) / per_client_round,
        "server_cpu_s": mean([r["server_cpu_s"] for r in rounds]),
        "upload_bytes_per_client": mean([r["upload_bytes_per_client"] for r in rounds]),
        "server_peak_mb": bench["server_peak_mb"],
        "max_abs_error": max(r["max_abs_error"] for r in rounds),
        # Extras: the CPU inside our handlers and mods (no process start), how many ClientApp
        # processes ran, their largest resident set, start-to-stop time of the deployment.
        "client_app_cpu_s": sum(c["app_cpu_s"] for c in cpu_records) / per_client_round,
        "client_processes": len(cpu_records),
        "client_peak_mb": max((c["peak_mb"] for c in cpu_records), default=0.0),
        "deployment_seconds": deployment_s,
        "rounds": rounds,
        "details": bench.get("details", {}),
    }


def run_variant(name: str, cohort: BenchCohort, opts: BenchOptions) -> dict[str, Any]:
    """One variant as a real deployment; its summary (see `summarize`)."""
    serverapp, clientapp = VARIANTS[name]
    folder = (opts.out / name).resolve()
    cpu_dir = folder / "cpu"
    shutil.rmtree(cpu_dir, ignore_errors=True)
    (folder / files.BENCH_RESULT).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"client-{i}" for i in range(cohort.clients)]
    # Every variant gets the same enrolled nodes; only `ours` uses the identity keys.
    node_dir = folder / ".flwr" / "nodes"
    pinned = enroll_hospitals(node_dir, names)
    settings = ServerSettings(out_dir=folder, variant=name, node_wait_s=300.0,
                              round_timeout_s=opts.timeout_s, grid_poll_s=opts.grid_poll_s,
                              pinned_keys=pinned)
    run_config = {**cohort.to_run_config(), **settings.to_run_config()}
    nodes = [replace(enrolled_node(node_dir, h, pinned), bench_index=i, cpu_dir=cpu_dir)
             for i, h in enumerate(names)]

    def poll() -> dict[str, Any] | None:
        path = folder / files.BENCH_RESULT
        return json.loads(path.read_text()) if path.exists() else None

    started = time.perf_counter()
    bench = run_deployment(
        Deployment(home=folder / ".flwr", workdir=folder, nodes=nodes, tls=opts.tls,
                   timeout_s=opts.timeout_s),
        FlowerApp(serverapp, clientapp, run_config), poll)
    deployment_s = time.perf_counter() - started
    if "error" in bench:
        raise RuntimeError(f"variant {name} failed: {bench['error']} (logs in {folder / 'logs'})")
    cpu_records = [json.loads(p.read_text()) for p in sorted(cpu_dir.glob(f"{name}-*.json"))]
    return summarize(bench, cpu_records, cohort, deployment_s)


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    def get(variant: str, key: str) -> float | None:
        value = results.get(variant, {}).get(key)
        return None if value is None else float(value)

    def seconds(variant: str, first: int) -> float | None:
        if first == 0:
            return get(variant, "seconds_per_round")
        rounds = results.get(variant, {}).get("rounds", [])[first:]
        return mean([r["seconds"] for r in rounds]) if rounds else None

    def extra_seconds(variant: str, first: int = 0) -> float | None:
        a, b = seconds(variant, first), seconds("plain", first)
        return None if a is None or b is None else a - b

    return {
        "upload_ours_over_plain": _ratio(get("ours", "upload_bytes_per_client"),
                                         get("plain", "upload_bytes_per_client")),
        "overhead_ours_over_flower": _ratio(extra_seconds("ours"), extra_seconds("flower")),
        # Without round 1, which carries our separate key advertisement: a long run's rounds.
        "overhead_ours_over_flower_after_round_1": _ratio(extra_seconds("ours", 1),
                                                          extra_seconds("flower", 1)),
        "error_ours_over_flower": _ratio(get("ours", "max_abs_error"),
                                         get("flower", "max_abs_error")),
        "upload_flower_over_plain": _ratio(get("flower", "upload_bytes_per_client"),
                                           get("plain", "upload_bytes_per_client")),
        "seconds_flower_over_plain": _ratio(get("flower", "seconds_per_round"),
                                            get("plain", "seconds_per_round")),
    }


def run_bench(cohort: BenchCohort, opts: BenchOptions) -> dict[str, Any]:
    opts.out.mkdir(parents=True, exist_ok=True)
    refs = [ref for name in opts.variants for ref in VARIANTS[name]]
    missing = missing_components(refs)
    result: dict[str, Any] = {"config": {
        **cohort.to_run_config(), "std": STD, "variants": list(opts.variants), "tls": opts.tls,
        "grid_poll_s": opts.grid_poll_s, "cpu_count": os.cpu_count(),
        "flwr": _flwr_version()}}
    for name in opts.variants:
        absent = [f"{ref} ({missing[ref]})" for ref in VARIANTS[name] if ref in missing]
        if absent:
            reason = f"not available yet: {', '.join(absent)}"
            print(f"bench secagg: skipping variant '{name}': {reason}", file=sys.stderr)
            result[name] = {"skipped": reason}
            continue
        print(f"bench secagg: variant '{name}': {cohort.clients} SuperNodes, "
              f"{cohort.params} parameters, {cohort.rounds} round(s) ...", file=sys.stderr,
              flush=True)
        result[name] = run_variant(name, cohort, opts)
        print(f"bench secagg: variant '{name}': {result[name]['seconds_per_round']:.2f} s per "
              f"round, max error {result[name]['max_abs_error']:.3g}", file=sys.stderr,
              flush=True)
    result["ratios"] = ratios({k: v for k, v in result.items() if k in VARIANTS})
    save_json(opts.out / files.BENCH_SECAGG, result)
    return result


def _flwr_version() -> str:
    from importlib.metadata import version

    return version("flwr")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedmri bench secagg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, required=True, help="SuperNodes (N >= 2)")
    parser.add_argument("--params", type=int, required=True, help="parameters per vector (M)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds per variant; round 1 carries our one-time key setup")
    parser.add_argument("--examples", default="1000",
                        help="each client's weight: one number, or N separated by commas")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-secagg"))
    parser.add_argument("--variants", default="plain,flower,ours",
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per variant")
    parser.add_argument("--grid-poll", type=float, default=0.2,
                        help="seconds between the ServerApp's pulls for replies")
    parser.add_argument("--insecure", action="store_true", help="no TLS between the processes")
    parser.add_argument("--json", action="store_true", help="print the JSON on one line")
    args = parser.parse_args(argv)
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"unknown variant(s) {', '.join(unknown) or '(none)'}; "
                     f"choose from {', '.join(VARIANTS)}")
    try:
        cohort = BenchCohort(clients=args.clients, params=args.params, rounds=args.rounds,
                             examples=parse_examples(args.examples, args.clients),
                             seed=args.seed)
    except ValueError as err:
        parser.error(str(err))
    opts = BenchOptions(out=args.out, variants=variants, tls=not args.insecure,
                        timeout_s=args.timeout, grid_poll_s=args.grid_poll)
    result, code = run_guarded("bench secagg", lambda: run_bench(cohort, opts))
    if result is None:
        return code
    print(json.dumps(result, indent=None if args.json else 2))
    return 0
