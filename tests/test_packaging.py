"""Packaging files, checked without a Docker engine or a systemd manager: the compose validator
against the vendored Compose spec, the fedmri command lines found in compose services, the
systemd units (`systemd-analyze verify` and their hardening), and the Dockerfile (stages, pins,
final image) with its health check script."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from fedmri.deploy.compose_check import fedmri_commands, validate

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "deploy" / "docker"
SYSTEMD = REPO / "deploy" / "systemd"
VARIANTS = ("cpu", "cuda")

# ----------------------------------------------------------------------------- compose

VALID = {
    "name": "fedmri",
    "x-common": {"image": "fedmri:cpu"},
    "services": {
        "coordinator": {
            "image": "fedmri:cpu",
            "environment": {"FEDMRI_ROLE": "coordinator"},
            "entrypoint": ["sh", "-c"],
            "command": ["set -e; fedmri server --home /state init --name demo; "
                        "exec fedmri server --home /state start"],
            "ports": ["9092:9092"],
            "volumes": ["coordinator:/state"],
            "healthcheck": {"test": ["CMD", "fedmri-healthcheck"], "interval": "30s"},
        },
        "hospital-a": {
            "image": "fedmri:cpu",
            "command": ["client", "--home", "/state", "start"],
            "depends_on": {"coordinator": {"condition": "service_healthy"}},
            "volumes": ["./data/a:/data:ro"],
        },
    },
    "volumes": {"coordinator": {}},
}


def _write(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def test_compose_schema_accepts_a_valid_file(tmp_path: Path) -> None:
    assert validate(_write(tmp_path, VALID)) == []


def test_compose_schema_rejects_bad_ports_and_unknown_keys(tmp_path: Path) -> None:
    broken = json.loads(json.dumps(VALID))
    broken["services"]["coordinator"]["ports"] = 5
    broken["servics"] = {}
    broken["services"]["hospital-a"]["restart_policy"] = "always"
    errors = validate(_write(tmp_path, broken))
    assert errors == [
        "$: unknown key 'servics'",
        "$.services.coordinator.ports: 5 is not of type 'array'",
        "$.services['hospital-a']: unknown key 'restart_policy'",
    ]


def test_compose_validate_reports_what_is_not_a_compose_mapping(tmp_path: Path) -> None:
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "bad.yaml").write_text("services: [\n")
    assert validate(tmp_path / "list.yaml") == [f"{tmp_path / 'list.yaml'}: a compose file is "
                                                "a mapping, not list"]
    assert "not YAML" in validate(tmp_path / "bad.yaml")[0]


def test_fedmri_commands_from_shell_scripts_and_plain_lists() -> None:
    script = ("set -eu\n"
              "# fedmri server start  (a comment, not a command)\n"
              "fedmri server --home /state init --name 'demo fed' --port 9092 || true\n"
              "if fedmri server --home /state status; then echo ok; fi\n"
              "exec env FOO=1 fedmri server --home /state start --rounds 2 2>&1 | tee log")
    compose = {"services": {
        "coordinator": {"entrypoint": ["/bin/sh", "-c"], "command": [script]},
        "hospital": {"command": ["client", "--home", "/state", "start"]},
        "exec-form": {"entrypoint": [], "command": ["bash", "-euo", "pipefail", "-c",
                                                    "fedmri kernels info && exec fedmri "
                                                    "client --home /state check", "name"]},
        "string-form": {"command": "client --home '/my state' check"},
        "other": {"entrypoint": ["python", "-m", "http.server"]},
        "image-default": {"image": "fedmri:cpu"},
    }}
    assert fedmri_commands(compose) == [
        ("coordinator", ["server", "--home", "/state", "init", "--name", "demo fed",
                         "--port", "9092"]),
        ("coordinator", ["server", "--home", "/state", "status"]),
        ("coordinator", ["server", "--home", "/state", "start", "--rounds", "2"]),
        ("hospital", ["client", "--home", "/state", "start"]),
        ("exec-form", ["kernels", "info"]),
        ("exec-form", ["client", "--home", "/state", "check"]),
        ("string-form", ["client", "--home", "/my state", "check"]),
    ]


def test_fedmri_commands_follow_the_image_entrypoint() -> None:
    """With the image's ENTRYPOINT ["fedmri"], a `command: [sh, -c, ...]` runs `fedmri sh ...`:
    reported as such, so that a check of the command lines catches it."""
    compose = {"services": {"s": {"command": ["sh", "-c", "fedmri client start"]}}}
    assert fedmri_commands(compose) == [("s", ["sh", "-c", "fedmri client start"])]
    assert fedmri_commands(compose, entrypoint=()) == [("s", ["client", "start"])]


# ----------------------------------------------------------------------------- systemd


def _unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file's sections as (key, value) lists: keys repeat (Environment=, DeviceAllow=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        else:
            key, _, value = line.partition("=")
            current.append((key.strip(), value.strip()))
    return sections


def _values(unit: dict[str, list[tuple[str, str]]], key: str) -> list[str]:
    return [v for entries in unit.values() for k, v in entries if k == key]


@pytest.mark.parametrize("role", ["server", "client"])
def test_systemd_unit_is_hardened(role: str) -> None:
    unit = _unit(SYSTEMD / f"fedmri-{role}.service")
    service = dict(unit["Service"])
    assert shlex.split(service["ExecStart"]) == [
        "/opt/fedmri/bin/fedmri", role, "--home", f"/var/lib/fedmri/{role}", "start"]
    assert service["User"] == service["Group"] == "fedmri"
    assert service["StateDirectory"] == f"fedmri/{role}"
    expected = {"NoNewPrivileges": "yes", "PrivateTmp": "yes", "ProtectSystem": "strict",
                "ProtectHome": "yes", "CapabilityBoundingSet": "", "Restart": "on-failure",
                "KillSignal": "SIGTERM", "LockPersonality": "yes"}
    assert {k: service.get(k) for k in expected} == expected
    assert {"RestartSec", "TimeoutStopSec"} <= service.keys()
    assert {"StartLimitIntervalSec", "StartLimitBurst"} <= dict(unit["Unit"]).keys()
    families = service["RestrictAddressFamilies"].split()
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families)
    env = " ".join(_values(unit, "Environment")).split()
    assert {"FLWR_TELEMETRY_ENABLED=0", "FLWR_DISABLE_UPDATE_CHECK=1"} <= set(env)
    if role == "client":  # the hospital's images read-only; GPUs reachable, nothing else
        assert service["ReadOnlyPaths"] == "/srv/fedmri/data"
        assert service.get("PrivateDevices", "no") == "no"
        assert service["DevicePolicy"] == "closed"
        assert any("nvidia" in d for d in _values(unit, "DeviceAllow"))
    else:
        assert service["PrivateDevices"] == "yes"


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here")
    return tool


@pytest.mark.parametrize("role", ["server", "client"])
def test_systemd_unit_verifies(role: str, tmp_path: Path) -> None:
    """`systemd-analyze verify` on a copy whose ExecStart is this environment's fedmri (verify
    requires the binary to exist). verify exits 0 also on directives it ignores (a typo, a bad
    value): any line it prints about the unit fails the test. It does not look up User=."""
    tool = _analyze()
    fedmri = shutil.which("fedmri", path=str(Path(sys.executable).parent)) or shutil.which(
        "fedmri")
    assert fedmri is not None, "the fedmri console script is not installed"
    name = f"fedmri-{role}.service"
    text = (SYSTEMD / name).read_text()
    assert "ExecStart=/opt/fedmri/bin/fedmri " in text
    unit = tmp_path / name
    unit.write_text(text.replace("ExecStart=/opt/fedmri/bin/fedmri ", f"ExecStart={fedmri} "))
    done = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True,
                          text=True, timeout=60)
    about_unit = [line for line in (done.stdout + done.stderr).splitlines() if name in line]
    assert done.returncode == 0 and not about_unit, done.stdout + done.stderr

    # The exposure score (0 safest .. 10): the units stay at "OK" (below 2.5).
    security = subprocess.run([tool, "security", "--offline=true", "--threshold=25",
                               "--no-pager", str(unit)], capture_output=True, text=True,
                              timeout=60)
    if "--offline" in security.stderr or "--threshold" in security.stderr:
        return  # systemd before 250: no offline security report
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr


# ----------------------------------------------------------------------------- Dockerfile


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def _dockerfile() -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults, and the stages with their instructions (continuations joined,
    comments dropped)."""
    lines: list[str] = []
    pending = ""
    for raw in (DOCKER / "Dockerfile").read_text().splitlines():
        if raw.strip().startswith("#") or not raw.strip():
            continue  # also comment lines inside a continuation, as Docker does
        pending += raw.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
        else:
            lines.append(pending)
            pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.strip().partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            stages.append(Stage(words[0], words[2] if len(words) > 2 else None))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
        elif keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default.strip('"')
    return args, stages


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], text)


def _final_chain(variant: str) -> tuple[list[Stage], str]:
    """The stages the final image is made of, last first, and the external image under them."""
    args, stages = _dockerfile()
    args = {**args, "VARIANT": variant}
    by_name = {s.name: s for s in stages if s.name}
    chain = [stages[-1]]
    while (base := _expand(chain[-1].base, args)) in by_name:
        chain.append(by_name[base])
    return chain, base


def _shell_commands(script: str) -> list[list[str]]:
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for word in lexer:
        if word in (";", "&&", "||", "|", "&"):
            commands.append([])
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


# pip install options that take a value (the value is not a requirement).
_PIP_VALUE_OPTIONS = {"-i", "--index-url", "--extra-index-url", "-f", "--find-links", "-c",
                      "--constraint", "-C", "--config-settings", "--trusted-host"}


def _pip_installs(script: str) -> list[list[str]]:
    """The arguments of each `pip install` (pip, pip3, a venv's bin/pip, python -m pip)."""
    found = []
    for words in _shell_commands(script):
        names = [Path(w).name for w in words]
        for i, name in enumerate(names):
            is_pip = re.fullmatch(r"pip3?(\.\d+)?", name) or (
                name.startswith("python") and words[i + 1:i + 3] == ["-m", "pip"])
            if is_pip:
                rest = words[i + (3 if name.startswith("python") else 1):]
                if rest[:1] == ["install"]:
                    found.append(rest[1:])
                break
    return found


def test_dockerfile_is_multi_stage_with_pinned_base_images() -> None:
    args, stages = _dockerfile()
    assert len(stages) >= 2
    names = {s.name for s in stages}
    for variant in VARIANTS:
        for stage in stages:
            image = _expand(stage.base, {**args, "VARIANT": variant})
            if image in names:
                continue
            repo, _, tag = image.rpartition(":")
            assert repo and tag and tag != "latest" and "/" not in tag, (
                f"base image {image!r} is not pinned by tag")
        chain, base = _final_chain(variant)
        assert "devel" not in base, f"the {variant} final image is based on {base}"


def test_dockerfile_every_pip_install_is_pinned() -> None:
    _, stages = _dockerfile()
    installs = [args for s in stages for run in s.all("RUN") for args in _pip_installs(run)]
    assert installs, "no pip install found: the parser is broken"
    for args in installs:
        assert "-e" not in args and "--editable" not in args, args
        requirements, skip = [], False
        for word in args:
            if skip:
                skip = False
            elif word in _PIP_VALUE_OPTIONS:
                skip = True
            elif not word.startswith("-"):
                requirements.append(word)
        assert requirements, args
        for req in requirements:
            assert req == "." or re.fullmatch(r"[A-Za-z0-9_.\-\[\],]+==[\w.+!]+", req), (
                f"pip install {req!r} is not pinned with ==")
    assert any("." in args for args in installs), "the repository itself is not installed"


@pytest.mark.parametrize("variant", VARIANTS)
def test_dockerfile_final_image(variant: str) -> None:
    chain, base = _final_chain(variant)
    final = chain[0]
    users = final.all("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert any("10001" in run for run in final.all("RUN")), "the fedmri user is not uid 10001"
    (health,) = final.all("HEALTHCHECK")
    assert health.split()[0] != "NONE" and "CMD" in health.split()
    assert final.all("ENTRYPOINT") == ['["fedmri"]']
    env = " ".join(final.all("ENV")).split()
    assert {"FLWR_TELEMETRY_ENABLED=0", "FLWR_DISABLE_UPDATE_CHECK=1"} <= set(env)
    compiler = re.compile(r"(build-essential|gcc|g\+\+|c\+\+|cc|clang|nvcc|cuda-nvcc|"
                          r"cuda-toolkit|ninja-build)([-.]?\d[\w.]*)?")
    for stage in chain:
        for run in stage.all("RUN"):
            for words in _shell_commands(run):
                if {"install", "add"} & set(words):
                    bad = [w for w in words if compiler.fullmatch(w)]
                    assert not bad, f"{stage.name or stage.base} installs {bad}: {run}"
    assert "gcc" not in base and "devel" not in base


def test_dockerfile_final_image_finds_the_prebuilt_kernels() -> None:
    """The kernels are built in the builder into FEDMRI_KERNELS_CACHE; the final stage copies
    the folder holding it and looks there too."""
    _, stages = _dockerfile()
    builder = next(s for s in stages if s.name == "builder")
    assert any("fedmri kernels build" in run for run in builder.all("RUN"))

    def cache(stage: Stage) -> str:
        found = re.findall(r"FEDMRI_KERNELS_CACHE=(\S+)", " ".join(stage.all("ENV")))
        assert found, f"stage {stage.name} does not set FEDMRI_KERNELS_CACHE"
        return str(found[-1])

    for variant in VARIANTS:
        final = _final_chain(variant)[0][0]
        assert cache(final) == cache(builder)
        copied = [c.split()[-2] for c in final.all("COPY") if "--from=builder" in c]
        assert any(cache(builder).startswith(src.rstrip("/") + "/") for src in copied), copied


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for a top-level path: the last pattern that matches decides."""
    ignored = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or (pattern.startswith("**/")
                                              and fnmatch.fnmatch(path, pattern[3:])):
            ignored = not keep
    return ignored


def test_docker_build_context_leaves_environments_out() -> None:
    lines = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    for out in (".git", ".venv", ".venv-cuda", "build", "dist", "runs", "fedmri.egg-info",
                "tests", ".mypy_cache"):
        assert _ignored(out, patterns), f"{out} would be sent to the Docker build"
    for needed in ("pyproject.toml", "README.md", "LICENSE", "server", "client", "common",
                   "proto", "kernels", "deploy"):
        assert not _ignored(needed, patterns), f"{needed} is left out of the Docker build"
    _, stages = _dockerfile()
    for stage in stages:
        for copy in stage.all("COPY"):
            words = [w for w in copy.split() if not w.startswith("--")]
            if "--from=" not in copy and words[0] != ".":
                assert (REPO / words[0]).exists(), f"COPY {words[0]}: no such file"


# ----------------------------------------------------------------------------- health check


def _fake_fedmri(tmp_path: Path, stdout: str, code: int) -> dict[str, str]:
    """A `fedmri` first on PATH that records its argv, prints `stdout` and exits `code`."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    script = bindir / "fedmri"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'calls'}\n"
                      f"cat <<'EOF'\n{stdout}\nEOF\nexit {code}\n")
    script.chmod(0o755)
    python = Path(sys.executable).parent  # python3 for the coordinator's JSON
    return {**os.environ, "PATH": f"{bindir}:{python}:{os.environ['PATH']}",
            "FEDMRI_HOME": "/st"}


def _health(env: dict[str, str], role: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in env.items() if k != "FEDMRI_ROLE"}
    if role is not None:
        env["FEDMRI_ROLE"] = role
    return subprocess.run([str(DOCKER / "healthcheck.sh")], env=env, capture_output=True,
                          text=True, timeout=30)


def test_healthcheck_hospital_is_client_check(tmp_path: Path) -> None:
    assert _health(_fake_fedmri(tmp_path, "h: healthy", 0), "hospital").returncode == 0
    assert _health(_fake_fedmri(tmp_path, "h: NOT healthy", 1), "hospital").returncode == 1
    assert (tmp_path / "calls").read_text().splitlines() == ["client --home /st check"] * 2
    assert _health(os.environ.copy(), None).returncode == 0  # a one-off command: no check
    assert _health(os.environ.copy(), "nurse").returncode == 1


def test_healthcheck_coordinator_needs_running_server_and_open_ports(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as link, \
            socket.create_server(("127.0.0.1", 0)) as enroll:
        ports = {"port": link.getsockname()[1], "enroll_port": enroll.getsockname()[1]}
        up = json.dumps({"federation": "f", "running": True, **ports})
        assert _health(_fake_fedmri(tmp_path, up, 0), "coordinator").returncode == 0
        down = json.dumps({"federation": "f", "running": False, **ports})
        result = _health(_fake_fedmri(tmp_path, down, 0), "coordinator")
        assert result.returncode == 1 and "not running" in result.stderr
    closed = _health(_fake_fedmri(tmp_path, up, 0), "coordinator")  # ports now closed
    assert closed.returncode == 1 and "refuses connections" in closed.stderr
    assert _health(_fake_fedmri(tmp_path, "", 1), "coordinator").returncode == 1
    assert (tmp_path / "calls").read_text().splitlines()[0] == "server --home /st status --json"
