"""The `fedmri` command: one root that finds each room's subcommands by name.

Rooms register `name = "module:function"` under the `fedmri.commands` entry-point group
(pyproject.toml), and benchmarks under `fedmri.bench` (`fedmri bench NAME`); a subcommand's
module is imported only when that subcommand runs, so
`fedmri --help` starts without importing torch, and this module imports no room.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

SUMMARIES = {
    "data": "inspect a hospital's DICOM folder (data scan DIR [--json])",
    "synth": "write a synthetic multi-hospital DICOM cohort",
    "simulate": "run the whole federation as local processes (SuperLink + one SuperNode each)",
    "train": "baselines: --central (pooled data) or --local HOSPITAL",
    "evaluate": "Dice of a saved model on a hospital's data",
    "kernels": "the compiled 3D convolution: kernels build | kernels info [--json]",
    "server": "the coordinator: server init|start|token|revoke|status|audit",
    "run": "federated runs on the coordinator: run start|status|stop|fetch-model|report",
    "client": "the hospital daemon: client init|check|start|status|members|accept",
    "bench": "benchmarks that print JSON against a baseline (bench NAME --help)",
}


BENCH_GROUP = "fedmri.bench"


def home_command(prog: str, description: str, default_home: str
                 ) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The parser of a command that keeps its state in `--home DIR` and has subcommands
    (`fedmri server`, `fedmri run`, `fedmri client`)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--home", type=Path, default=None,
                        help=f"keys, config and state (default {default_home})")
    return parser, parser.add_subparsers(dest="command", required=True)


# What a command reports as one line and exit code 1, rather than a traceback.
OPERATOR_ERRORS = (FileNotFoundError, FileExistsError, ValueError, RuntimeError, TimeoutError)


def report_errors(prog: str, work: Callable[[], int]) -> int:
    try:
        return work()
    except OPERATOR_ERRORS as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 1


def _commands(group: str = "fedmri.commands") -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def _usage(commands: dict[str, EntryPoint]) -> str:
    lines = ["usage: fedmri COMMAND [ARGS...]", "", "commands:"]
    for name in sorted([*commands, "bench"]):
        lines.append(f"  {name:<10} {SUMMARIES.get(name, '')}")
    lines.append("")
    lines.append("Run `fedmri COMMAND --help` for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    commands = _commands()
    if args[:1] == ["bench"]:
        return _bench(args[1:])
    if not args or args[0] in ("-h", "--help"):
        print(_usage(commands))
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in commands:
        print(f"fedmri: unknown command '{name}'\n\n{_usage(commands)}", file=sys.stderr)
        return 2
    run = commands[name].load()
    try:
        return int(run(rest) or 0)
    except KeyboardInterrupt:
        print("fedmri: interrupted", file=sys.stderr)
        return 130


def _bench(args: list[str]) -> int:
    benches = _commands(BENCH_GROUP)
    if not args or args[0] in ("-h", "--help") or args[0] not in benches:
        print("usage: fedmri bench NAME [ARGS...]\n\nbenchmarks: " + ", ".join(sorted(benches)))
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    return int(benches[args[0]].load()(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
