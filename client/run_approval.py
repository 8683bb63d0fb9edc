"""Each hospital approves the runs it joins.

Flower sends a run to every connected SuperNode; the ClientApp takes part only in runs its
operator approved (`fedmri client approve RUN`) or its policy approves (policy.toml,
`approve = "policy"`), and never in a run that breaks the policy's rules (allowed models,
secure aggregation required, fewest volumes per update, most rounds and local epochs). A
refusal raises RunRefused: Flower returns it to the coordinator as the reply's error, where
it shows as the reason the hospital did not take part; nothing hangs.

An approval is bound to the run's configuration (a digest of it): a coordinator that changes
the configuration of an approved run is refused. Files, in the node config's `runs-dir`:
RUN.json (what the hospital saw, written by the ClientApp) and RUN.approved (written by the
operator's command or by the policy).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmri.common.checkpoint import save_json
from fedmri.common.config import RunConfig
from fedmri.proto.node_config import NodeConfig
from fedmri.proto.typed_config import POSITIVE, read_toml, setting, toml_text

MODES = ("manual", "policy")


class RunRefused(Exception):
    """This hospital does not take part in the run; the message says why."""


@dataclass(frozen=True)
class RunPolicy:
    approve: str = setting("approve", "manual",
                           "manual: every run waits for `fedmri client approve RUN`; policy: "
                           "runs within the rules below are approved without asking",
                           ("manual or policy", lambda v: v in MODES))
    models: str = setting("models", "unet,basicunet,segresnet", "models allowed, comma-separated")
    require_secure: bool = setting("require-secure", True,
                                   "take part only with secure aggregation")
    min_volumes: int = setting("min-volumes", 1,
                               "fewest training volumes an update may be built from", POSITIVE)
    max_rounds: int = setting("max-rounds", 200, "most rounds a run may have", POSITIVE)
    max_local_epochs: int = setting("max-local-epochs", 100, "most local epochs per round",
                                    POSITIVE)

    @classmethod
    def read(cls, path: Path | None) -> RunPolicy:
        if path is None or not Path(path).exists():
            return cls()
        return read_toml(cls, path, "")

    def write(self, path: Path) -> None:
        path.write_text(toml_text(self))

    def violations(self, cfg: RunConfig, volumes: int | None) -> list[str]:
        out = []
        allowed = [m.strip() for m in self.models.split(",") if m.strip()]
        if cfg.model not in allowed:
            out.append(f"model {cfg.model!r} is not allowed (policy: {', '.join(allowed)})")
        if self.require_secure and not cfg.secure:
            out.append("the run is not secure; the policy requires secure aggregation")
        if cfg.rounds > self.max_rounds:
            out.append(f"{cfg.rounds} rounds exceed the policy's {self.max_rounds}")
        if cfg.local_epochs > self.max_local_epochs:
            out.append(f"{cfg.local_epochs} local epochs exceed the policy's "
                       f"{self.max_local_epochs}")
        if volumes is not None and volumes < self.min_volumes:
            out.append(f"an update from {volumes} volumes is below the policy's "
                       f"{self.min_volumes}")
        return out


def describe(cfg: RunConfig) -> dict[str, Any]:
    """What an operator approves: the run's configuration and its digest."""
    config = cfg.to_dict()
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return {"model": cfg.model, "rounds": cfg.rounds, "local_epochs": cfg.local_epochs,
            "batch_size": cfg.batch_size, "secure": cfg.secure, "digest": digest,
            "config": config}


def _safe_run_id(run_id: int | str) -> str:
    text = str(run_id)
    if not (text.isascii() and text.isdigit()):
        raise RunRefused(f"run id {text!r} is not a Flower run id")
    return text


def gate(node: NodeConfig, run_id: int | str, cfg: RunConfig,
         participants: list[str] | None = None, volumes: int | None = None) -> None:
    """Return if this hospital takes part in the run; else RunRefused with the reason."""
    if node.runs_dir is None:  # no approval configured (simulate's in-process benches)
        return
    run = _safe_run_id(run_id)
    seen_file = node.runs_dir / f"{run}.json"
    summary = describe(cfg)
    seen = json.loads(seen_file.read_text()) if seen_file.exists() else {
        "run": run, "first_seen": time.time(), **summary}
    if participants is not None:
        seen["participants"] = sorted(participants)
    policy = RunPolicy.read(node.run_policy)
    problems = policy.violations(cfg, volumes)
    approval_file = node.runs_dir / f"{run}.approved"
    approval = json.loads(approval_file.read_text()) if approval_file.exists() else None
    if not problems and approval is not None and approval["digest"] != summary["digest"]:
        problems.append("the run's configuration changed since it was approved")
    if not problems and approval is None:
        if policy.approve == "policy":
            save_json(approval_file, {"digest": summary["digest"], "by": "policy",
                                      "at": time.time()})
        else:
            problems.append(f"waiting for its operator: fedmri client approve {run}")
    seen["refused"] = "; ".join(problems) or None
    save_json(seen_file, seen)
    if problems:
        raise RunRefused(f"hospital {node.hospital} does not take part in run {run}: "
                         + "; ".join(problems))


def approve(runs_dir: Path, run: str, actor: str) -> dict[str, Any]:
    seen_file = runs_dir / f"{_safe_run_id(run)}.json"
    if not seen_file.exists():
        raise ValueError(f"run {run} has not reached this hospital yet (see `fedmri client "
                         "runs`)")
    seen = json.loads(seen_file.read_text())
    save_json(runs_dir / f"{run}.approved", {"digest": seen["digest"], "by": actor,
                                             "at": time.time()})
    return dict(seen)


def runs(runs_dir: Path) -> list[dict[str, Any]]:
    out = []
    for seen_file in sorted(runs_dir.glob("*.json")) if runs_dir.exists() else []:
        seen = json.loads(seen_file.read_text())
        approved = seen_file.with_suffix(".approved")
        by = json.loads(approved.read_text())["by"] if approved.exists() else None
        refused = seen.get("refused") or ""
        state = ("approved" if by and not refused else
                 "pending" if not refused or "waiting for its operator" in refused else
                 "refused")
        out.append({**{k: v for k, v in seen.items() if k != "config"}, "state": state,
                    "approved_by": by})
    return out
