"""The coordinator's Flower ServerApp.

Run config (the Flower App's [tool.flwr.app.config], overridable with `flwr run -c`): every
RunConfig field (fedmri.common.config) plus the ServerApp's settings
(fedmri.proto.run_config.ServerSettings: out dir, min nodes, timeouts, pinned keys).
"""

from __future__ import annotations

import traceback

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmri.common.config import RunConfig
from fedmri.proto import files
from fedmri.proto.events import EventLog, Failed
from fedmri.proto.run_config import ServerSettings
from fedmri.server.federation import Federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = dict(context.run_config)
    settings = ServerSettings.from_run_config(run_config)
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    emit = EventLog(settings.out_dir / files.EVENTS)
    try:
        cfg = RunConfig.from_dict(run_config)
        Federation(grid, cfg, settings, str(context.run_id), emit).run()
    except Exception as err:
        emit(Failed(f"{type(err).__name__}: {err}", traceback.format_exc(limit=5)))
        raise
