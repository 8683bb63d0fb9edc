"""Regenerate (or check) the Python modules of the .proto services in this folder.

`python -m fedmri.proto.generate` rewrites them; `--check` exits 1, naming the file, when a
checked-in module differs from what the pinned grpcio-tools makes of its .proto (CI runs it).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = ("enrollment.proto",)


def generated(source: str) -> dict[str, bytes]:
    """The modules grpcio-tools makes of `source`, by file name."""
    from grpc_tools import protoc  # a dev dependency: only regeneration needs it

    with tempfile.TemporaryDirectory() as out:
        # Mapping the folder to fedmri/proto makes the modules import each other by the
        # package path (from fedmri.proto import ...), not as top-level modules.
        include = Path(protoc.__file__).parent / "_proto"
        code = protoc.main(["protoc", f"-Ifedmri/proto={HERE}", f"-I{include}",
                            f"--python_out={out}", f"--pyi_out={out}",
                            f"--grpc_python_out={out}", f"fedmri/proto/{source}"])
        if code != 0:
            raise RuntimeError(f"protoc failed on {HERE / source} (exit code {code})")
        folder = Path(out) / "fedmri" / "proto"
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for source in SOURCES:
        for name, data in generated(source).items():
            target = HERE / name
            if check:
                if not target.exists() or target.read_bytes() != data:
                    stale.append(str(target))
            else:
                target.write_bytes(data)
    if stale:
        print("generated modules out of date (run python -m fedmri.proto.generate): "
              + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
