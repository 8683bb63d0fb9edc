"""`fedmri run start|status|stop|fetch-model|report`: runs on the coordinator's SuperLink."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedmri.common.cli import home_command, report_errors
from fedmri.common.config import add_run_config_args, run_config_from_args
from fedmri.server.home import CoordinatorHome


def main(argv: list[str]) -> int:
    from fedmri.server.cli import _actor

    parser, sub = home_command("fedmri run", "Start, watch and stop federated runs.",
                               "~/.fedmri/server")
    p = sub.add_parser("start", help="submit a run to the SuperLink")
    p.add_argument("--min-nodes", type=int, default=None,
                   help="hospitals the first round waits for (default: every member)")
    p.add_argument("--node-wait", type=float, default=600.0, help="seconds to wait for them")
    p.add_argument("--round-timeout", type=float, default=3600.0,
                   help="seconds for a step with training")
    p.add_argument("--stage-timeout", type=float, default=120.0,
                   help="seconds for a secure-aggregation step without training")
    p.add_argument("--wait", action="store_true",
                   help="follow the run, one line per round, until it ends; exit 1 unless "
                        "it finished")
    p.add_argument("--wait-timeout", type=float, default=None, help="seconds to --wait")
    add_run_config_args(p)
    for name in ("status", "stop", "fetch-model", "report"):
        p = sub.add_parser(name)
        p.add_argument("run", nargs="?", default=None, help="run name or id (default: latest)")
        if name == "status":
            p.add_argument("--json", action="store_true")
        if name == "fetch-model":
            p.add_argument("--out", type=Path, default=Path("."), help="file or folder")
        if name == "report":
            p.add_argument("--out", type=Path, required=True,
                           help="folder for report.json, the global model and the plots")
            p.add_argument("--test-data", type=Path, default=None,
                           help="a held-back site to score the global model on")
    args = parser.parse_args(argv)
    home = CoordinatorHome.at(args.home)
    return report_errors(f"fedmri run {args.command}", lambda: _dispatch(args, home, _actor()))


def _dispatch(args: argparse.Namespace, home: CoordinatorHome, actor: str) -> int:
    from fedmri.server import runs

    if args.command == "start":
        record = runs.start_run(home, run_config_from_args(args), args.min_nodes,
                                args.node_wait, args.round_timeout, args.stage_timeout, actor)
        print(f"run {record['run']} started (Flower run {record['run_id']}), members "
              f"{', '.join(record['members'])}; watch it: fedmri run status", flush=True)
        if not args.wait:
            return 0
        from fedmri.proto.events import Done, Event

        def show(event: Event) -> None:
            line = runs.describe(event)
            if line:
                print(line, flush=True)

        end = runs.wait_for_end(home.runs / record["run"], show, args.wait_timeout)
        print(f"run {record['run']}: {'finished' if isinstance(end, Done) else 'failed'}")
        return 0 if isinstance(end, Done) else 1
    if args.command == "status":
        summary = runs.summarize(runs.find_run(home, args.run))
        if args.json:
            print(json.dumps(summary, indent=2))
            return 0
        print(f"run {summary['run']} (Flower {summary['run_id']}): {summary['state']}, round "
              f"{summary['round']}/{summary['rounds']}, secure {summary['secure']}")
        for m in summary["metrics"]:
            losses = " ".join(f"{h}={v:.3f}" for h, v in m["train_loss"].items())
            print(f"  round {m['round']}: {m['seconds']:.1f}s, {m['hospitals']} hospitals, "
                  f"loss {losses}")
        for problem in summary["problems"]:
            print(f"  problem: {problem}")
        return 0
    if args.command == "stop":
        summary = runs.stop_run(home, args.run, actor)
        print(f"run {summary['run']} stopped after round {summary['round']}")
        return 0
    if args.command == "report":
        from fedmri.server.report import write_report

        report = write_report(runs.find_run(home, args.run), args.out, args.test_data)
        dice = (f", test-site Dice {report['test_dice']:.3f}" if "test_dice" in report
                else "")
        print(f"report of run {report['run']} ({len(report['rounds'])} rounds{dice}) "
              f"written to {args.out}")
        return 0
    out = runs.fetch_model(home, args.run, args.out)
    print(f"global model written to {out}")
    return 0
