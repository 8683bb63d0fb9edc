"""The regular wheel of this repository, installed into a fresh virtual environment: it holds
every file a kernel build reads (the CUDA one included), and its C++ kernels compile and compute
there. The editable install of the dev environment hides a missing package-data pattern; this
does not."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

from fedmri.kernels import build

REPO = Path(__file__).resolve().parents[1]
# Build outputs and environments of the checkout stay behind: a stale build/lib would leak into
# the wheel, and setuptools writes build/ and *.egg-info into the tree it builds.
_NOT_SOURCES = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info",
                                      "__pycache__", ".*_cache", ".hypothesis", "runs")

# Run inside the fresh environment: where fedmri.kernels comes from, the library it built, and
# one convolution against F.conv3d (float64: the two should agree to rounding).
_PROBE = """
import json, torch, torch.nn.functional as F
import fedmri.kernels
from fedmri.kernels import build, conv3d
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 3, 5, 6, 7, dtype=torch.float64, generator=g)
w = torch.randn(4, 3, 3, 3, 3, dtype=torch.float64, generator=g)
b = torch.randn(4, dtype=torch.float64, generator=g)
y = conv3d(x, w, b, activation="relu")
ref = F.relu(F.conv3d(x, w, b, padding=1))
print(json.dumps({"package": fedmri.kernels.__file__, "library": build.read_manifest().library,
                  "shape": list(y.shape), "err": float((y - ref).abs().max())}))
"""


def _run(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
         ) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def _fresh_env(root: Path) -> tuple[Path, Path]:
    """A virtual environment without pip whose site-packages also sees this environment's
    (torch and co., nothing downloaded); returns its python and site-packages."""
    venv.create(root, with_pip=False)
    python = root / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                         "['purelib'])"]).stdout.strip())
    # A path line of a .pth file is appended to sys.path, after the fresh site-packages, and the
    # .pth files inside it are not read: this environment's editable fedmri stays out.
    (site / "dev_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python, site


def test_wheel_installs_kernel_sources_and_builds(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_NOT_SOURCES)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", str(tmp_path / "dist"), str(src)])
    (wheel,) = (tmp_path / "dist").glob("fedmri-*.whl")

    python, site = _fresh_env(tmp_path / "env")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
          "--no-index", "-q", str(wheel)])

    # Every file the CUDA build reads (sources and the headers they include), by name.
    csrc = site / "fedmri" / "kernels" / "csrc"
    needed = sorted(path.name for path in build.build_inputs(cuda=True))
    assert needed, "kernels/build.py lists no sources"
    missing = [name for name in needed if not (csrc / name).is_file()]
    assert not missing, f"the wheel lacks kernels/csrc/{', '.join(missing)} (package-data)"

    env = {**os.environ, "FEDMRI_KERNELS_CACHE": str(tmp_path / "cache")}
    env.pop("PYTHONPATH", None)
    _run([str(python), "-m", "fedmri.kernels.cli", "build"], env=env, cwd=tmp_path)
    probe = json.loads(_run([str(python), "-c", _PROBE], env=env, cwd=tmp_path)
                       .stdout.strip().splitlines()[-1])
    assert Path(probe["package"]).is_relative_to(site), probe  # the wheel's copy, not the repo's
    assert Path(probe["library"]).is_relative_to(tmp_path / "cache"), probe
    assert probe["shape"] == [2, 4, 5, 6, 7]
    assert probe["err"] < 1e-10, probe
