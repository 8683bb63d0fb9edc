"""`fedmri data ...`: check what a hospital's DICOM export holds before training on it.

    fedmri data scan DIR [--json]

prints one line per series (accepted or rejected, with the reason) and a summary, or with
--json exactly ``{"series": [{"path", "series_uid", "status", "reason", "shape",
"spacing"}, ...]}``. Rejected series are a normal outcome (exit 0); a missing DIR exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from fedmri.client.dicom import SeriesResult, scan

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmri data",
        description="Inspect the DICOM data a hospital client would train on.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    scan_p = sub.add_parser(
        "scan",
        help="find MR series under DIR and say which are usable and why not",
        description=(
            "Walk DIR, group DICOM files by series, and report for each series whether it "
            "can be used (shape, spacing) or why not. Files ending in .nii, .nii.gz, .json, "
            ".txt, .md, .png, hidden files and DICOMDIR are skipped."
        ),
    )
    scan_p.add_argument("dir", metavar="DIR", type=Path, help="folder holding the DICOM export")
    scan_p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return parser


def _fmt_shape(result: SeriesResult) -> str:
    return "x".join(str(n) for n in result.shape) if result.shape else "-"


def _fmt_spacing(result: SeriesResult) -> str:
    if not result.spacing:
        return "-"
    return "x".join(f"{v:g}" for v in result.spacing) + "mm"


def _human(results: list[SeriesResult]) -> str:
    lines = []
    for r in results:
        line = (
            f"{r.status:<8}  {r.series_uid or '-'}  shape={_fmt_shape(r)}  "
            f"spacing={_fmt_spacing(r)}  path={r.path}"
        )
        if r.reason:
            line += f"  reason: {r.reason}"
        lines.append(line)
    accepted = sum(1 for r in results if r.accepted)
    series = sum(1 for r in results if r.series_uid is not None)
    loose = len(results) - series
    summary = f"{series} series: {accepted} accepted, {series - accepted} rejected"
    if loose:
        summary += f"; {loose} unreadable file(s)"
    lines.append(summary)
    return "\n".join(lines)


def _progress_callback() -> tuple[Callable[[str, int, int], None] | None, Callable[[], None]]:
    """A rich progress bar on stderr when it is a terminal, nothing otherwise."""
    if not sys.stderr.isatty():
        return None, lambda: None
    from rich.console import Console
    from rich.progress import Progress, TaskID

    progress = Progress(console=Console(stderr=True), transient=True)
    progress.start()
    tasks: dict[str, TaskID] = {}
    labels = {"read": "reading headers", "check": "checking series"}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(labels.get(stage, stage), total=total)
        progress.update(tasks[stage], completed=done, total=total)

    return update, progress.stop


def _scan(args: argparse.Namespace) -> int:
    root: Path = args.dir
    if not root.exists():
        print(
            f"fedmri data scan: error: {root} does not exist; give the folder that holds "
            "the DICOM export",
            file=sys.stderr,
        )
        return 2
    if not root.is_dir():
        print(f"fedmri data scan: error: {root} is not a folder", file=sys.stderr)
        return 2
    callback, stop = (None, lambda: None) if args.json else _progress_callback()
    try:
        results = scan(root, progress=callback)
    finally:
        stop()
    if args.json:
        print(json.dumps({"series": [r.to_json() for r in results]}, indent=2))
    else:
        print(_human(results))
    return 0


def main(argv: list[str]) -> int:
    """Run `fedmri data` with `argv` (the arguments after "data"); returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and usage errors (2)
        return int(exc.code) if isinstance(exc.code, int) else 2
    if args.command == "scan":
        return _scan(args)
    parser.error(f"unknown command {args.command}")
    return 2
