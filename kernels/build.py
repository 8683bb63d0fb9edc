"""Compiling and loading the `fedmri` operator library from kernels/csrc.

torch's C++ extension tooling builds it on first use (or `fedmri kernels build`) into a cache
folder keyed by the torch build, so a CPU and a CUDA torch never share binaries. The C++ (CPU)
part is always built; the CUDA part only with a CUDA build of torch and nvcc (CUDA_HOME).
A manifest beside the library records what was built, for `fedmri kernels info`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
CPU_SOURCES = ("registration.cpp", "conv3d_cpu.cpp", "conv3d_cpu_direct.cpp",
               "shm_counters.cpp", "row_stats.cpp")
# The host dispatch and one file per kernel family, so that ninja compiles them in parallel;
# longest compile first (ninja starts jobs in this order).
CUDA_SOURCES = ("conv3d_cuda.cu", "conv3d_cuda_wgmma.cu", "conv3d_cuda_wmma.cu",
                "conv3d_cuda_simt.cu", "conv3d_cuda_wgrad.cu")
# Compiled when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset: Ampere and Hopper.
# Hopper is built as sm_90a (arch-specific: wgmma); a plain "9.0" gets the WMMA kernels only.
DEFAULT_ARCHS = "8.0;9.0a"


@dataclass
class Toolchain:
    """What a build here can compile, and why a backend is left out."""

    cuda: bool
    cuda_home: str | None = None
    archs: list[str] = field(default_factory=list)
    reason: str | None = None


def _nvcc_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home if (Path(home) / "bin" / "nvcc").exists() else None
    # A `nvcc` on PATH may be a wrapper script (/usr/local/bin/nvcc here): probe the usual
    # toolkit folders, which hold bin/nvcc next to lib64/libcudart.so.
    for root in sorted(Path("/usr/local").glob("cuda*"), reverse=True):
        if (root / "bin" / "nvcc").exists() and (root / "lib64").exists():
            return str(root.resolve())
    return None


def _pip_cuda_includes() -> list[str]:
    """Header folders of the CUDA libraries torch's wheel depends on (cusparse.h, cublas, ...):
    a bare toolkit may lack them. Searched after the toolkit's own headers."""
    try:
        import nvidia
    except ImportError:
        return []
    found = [p for root in nvidia.__path__ for p in sorted(Path(root).glob("cu*/include"))]
    return [flag for p in found for flag in ("-isystem", str(p))]


def toolchain() -> Toolchain:
    if torch.version.cuda is None:
        return Toolchain(False, reason=f"torch {torch.__version__} is a CPU build")
    home = _nvcc_home()
    if home is None:
        return Toolchain(False, reason="nvcc not found: set CUDA_HOME to the CUDA toolkit folder "
                                       "(the one holding bin/nvcc and lib64/libcudart.so)")
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        archs = ";".join(_arch_name(a, b) for a, b in _visible_archs()) or DEFAULT_ARCHS
    return Toolchain(True, home, [a for a in archs.replace(" ", ";").split(";") if a])


def _arch_name(major: int, minor: int) -> str:
    return f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else "")


def _visible_archs() -> list[tuple[int, int]]:
    if not torch.cuda.is_available():
        return []
    return sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})


def cache_dir(chain: Toolchain) -> Path:
    root = Path(os.environ.get("FEDMRI_KERNELS_CACHE",
                               Path.home() / ".cache" / "fedmri" / "kernels"))
    flavour = f"cu{torch.version.cuda}-{'-'.join(chain.archs)}" if chain.cuda else "cpu"
    return root / f"torch{torch.__version__.replace('+', '_')}-{flavour}"


def sources(cuda: bool) -> list[Path]:
    """What a build compiles: the C++ sources, and with `cuda` first the CUDA ones (the longer
    compiles: started first, they end with the rest on a few cores)."""
    return [CSRC / n for n in (CUDA_SOURCES if cuda else ()) + CPU_SOURCES]


_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', re.MULTILINE)


def build_inputs(cuda: bool) -> list[Path]:
    """Every file of csrc a build reads: its sources and the headers they include
    (`#include "..."`, followed through headers; conditional includes count too). The
    fingerprint covers these, and an installed package must hold them."""
    found: set[Path] = set()
    pending = [(path, "kernels/build.py") for path in sources(cuda)]
    while pending:
        path, wanted_by = pending.pop()
        if path in found:
            continue
        if not path.is_file():
            raise FileNotFoundError(f"fedmri.kernels: {path} (needed by {wanted_by}) is missing: "
                                    "reinstall fedmri")
        found.add(path)
        pending += [(path.parent / name, path.name)
                    for name in _INCLUDE.findall(path.read_text())]
    return sorted(found)


def _fingerprint(cuda: bool) -> str:
    digest = hashlib.sha256()
    for path in build_inputs(cuda):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


@dataclass
class Built:
    library: str
    cuda: bool
    archs: list[str]
    torch: str
    cuda_version: str | None
    fingerprint: str
    seconds: float


def _manifest(folder: Path) -> Path:
    return folder / "manifest.json"


def read_manifest(chain: Toolchain | None = None) -> Built | None:
    """The build for this torch and toolchain, if one exists and matches the sources."""
    chain = chain or toolchain()
    path = _manifest(cache_dir(chain))
    if not path.exists():
        return None
    built = Built(**json.loads(path.read_text()))
    if built.fingerprint != _fingerprint(chain.cuda) or not Path(built.library).exists():
        return None
    return built


def build(verbose: bool = False) -> Built:
    """Compile (if the cache is stale) and return what was built; a fresh build is loaded."""
    chain = toolchain()
    existing = read_manifest(chain)
    if existing is not None:
        return existing
    folder = cache_dir(chain)
    folder.mkdir(parents=True, exist_ok=True)
    what = "C++ and CUDA (" + ", ".join(chain.archs) + ")" if chain.cuda else "C++"
    print(f"fedmri.kernels: compiling the {what} extension into {folder} "
          "(first use only; takes a minute or more) ...", file=sys.stderr, flush=True)
    env = {"TORCH_CUDA_ARCH_LIST": ";".join(chain.archs)} if chain.cuda else {}
    if chain.cuda_home:
        env["CUDA_HOME"] = chain.cuda_home
    started = time.perf_counter()
    with _environ(env):
        from torch.utils import cpp_extension  # reads CUDA_HOME at import: ours

        cpp_extension.CUDA_HOME = chain.cuda_home  # also when imported earlier
        library = cpp_extension.load(
            name=f"fedmri_kernels_{'cuda' if chain.cuda else 'cpu'}",
            sources=[str(s) for s in sources(chain.cuda)],
            extra_cflags=["-O3", "-fopenmp"],
            extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo", *_sm90a_flag(chain),
                               *_pip_cuda_includes()],
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            with_cuda=chain.cuda,
            is_python_module=False,
            verbose=verbose,
        )
    built = Built(library=str(library), cuda=chain.cuda, archs=chain.archs,
                  torch=torch.__version__, cuda_version=torch.version.cuda,
                  fingerprint=_fingerprint(chain.cuda),
                  seconds=round(time.perf_counter() - started, 1))
    staged = _manifest(folder).with_suffix(f".{os.getpid()}.tmp")
    staged.write_text(json.dumps(asdict(built), indent=2))
    staged.replace(_manifest(folder))  # atomic: hospitals' processes may build at once
    return built


def _sm90a_flag(chain: Toolchain) -> list[str]:
    """The wgmma kernels are compiled in only when sm_90a code is built."""
    return ["-DFEDMRI_SM90A"] if "9.0a" in chain.archs else []


class _environ:
    def __init__(self, values: dict[str, str]) -> None:
        self.values, self.saved = values, {k: os.environ.get(k) for k in values}

    def __enter__(self) -> None:
        os.environ.update(self.values)

    def __exit__(self, *exc: object) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
