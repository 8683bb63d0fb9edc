"""`fedmri kernels build|info [--json]`: compile the operator library, and say what is there."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from fedmri.kernels import build


def info() -> dict[str, Any]:
    """Which backends are compiled for this torch, for which CUDA architectures, and why not."""
    chain = build.toolchain()
    built = build.read_manifest(chain)
    missing = "not built yet for this torch: run `fedmri kernels build`"
    cpu: dict[str, Any] = {"compiled": built is not None}
    cuda: dict[str, Any] = {"compiled": bool(built and built.cuda),
                            "archs": built.archs if built and built.cuda else []}
    if built is None:
        cpu["reason"] = missing
        cuda["reason"] = chain.reason or missing
    else:
        cpu["library"] = built.library
        cuda["reason"] = None if built.cuda else chain.reason
    return {
        "backends": {"cpu": cpu, "cuda": cuda},
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_home": chain.cuda_home,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cache": str(build.cache_dir(chain)),
    }


def _print(report: dict[str, Any]) -> None:
    print(f"torch {report['torch']} (CUDA {report['cuda'] or 'none'}); cache {report['cache']}")
    for name, backend in report["backends"].items():
        state = "compiled" if backend["compiled"] else "missing"
        archs = f" for sm {', '.join(backend['archs'])}" if backend.get("archs") else ""
        why = f": {backend['reason']}" if backend.get("reason") else ""
        print(f"  {name:<5} {state}{archs}{why}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedmri kernels", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="compile the extension for this torch (cached)")
    b.add_argument("--require-cuda", action="store_true",
                   help="fail unless the CUDA backend can be compiled (CI)")
    b.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    i = sub.add_parser("info", help="which backends are compiled, and why one is missing")
    i.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.action == "info":
        report = info()
        print(json.dumps(report, indent=2)) if args.json else _print(report)
        return 0
    chain = build.toolchain()
    if args.require_cuda and not chain.cuda:
        print(f"fedmri kernels build: the CUDA backend cannot be built: {chain.reason}",
              file=sys.stderr)
        return 1
    built = build.build(verbose=args.verbose)
    what = f"C++ + CUDA (sm {', '.join(built.archs)})" if built.cuda else "C++ only"
    print(f"fedmri kernels: {what} ready in {built.library} "
          f"(torch {built.torch}; compiled in {built.seconds} s)")
    if not built.cuda and chain.reason:
        print(f"  no CUDA backend: {chain.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
