"""The coordinator's Flower ServerApp.

Run config (the Flower App's [tool.flwr.app.config], overridable with `flwr run -c`):
every RunConfig field, plus `out-dir` (where checkpoints and events go), `min-nodes`,
`node-wait-s`, `round-timeout-s`, `stage-timeout-s` and, for secure aggregation,
`pinned-keys` (a JSON file of the enrolled hospitals' Ed25519 public keys).
"""

from __future__ import annotations

import traceback
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmri.common.config import RunConfig
from fedmri.server.federation import Federation, FederationSettings, event_file_sink

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = dict(context.run_config)
    out_dir = Path(str(run_config.get("out-dir", "fedmri-run")))
    out_dir.mkdir(parents=True, exist_ok=True)
    emit = event_file_sink(out_dir)
    try:
        cfg = RunConfig.from_dict(run_config)
        pinned = str(run_config.get("pinned-keys", ""))
        settings = FederationSettings(
            out_dir=out_dir,
            run_id=str(context.run_id),
            pinned_keys=Path(pinned) if pinned else None,
            min_nodes=int(run_config.get("min-nodes", 1)),
            node_wait_s=float(run_config.get("node-wait-s", 300.0)),
            round_timeout_s=float(run_config.get("round-timeout-s", 3600.0)),
            stage_timeout_s=float(run_config.get("stage-timeout-s", 120.0)),
        )
        Federation(grid, cfg, settings, emit).run()
    except Exception as err:
        emit({"event": "failed", "error": f"{type(err).__name__}: {err}",
              "trace": traceback.format_exc(limit=5)})
        raise
