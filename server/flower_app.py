"""The Flower App the coordinator submits: a pyproject naming fedmri's installed components.

The app bundle carries no code of its own (one empty module, as Flower requires); its
components are `fedmri.server.app:app` and `fedmri.client.app:app` of the installed fedmri.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmri.proto.typed_config import toml_value


@dataclass
class FlowerApp:
    serverapp: str  # "module:attribute" of an installed package
    clientapp: str
    run_config: Mapping[str, Any] = field(default_factory=dict)


def write_flower_app(app_dir: Path, app: FlowerApp) -> None:
    """A Flower App whose components come from the installed fedmri package."""
    app_dir.mkdir(parents=True, exist_ok=True)
    config_lines = "\n".join(f"{k} = {toml_value(v)}" for k, v in app.run_config.items())
    (app_dir / "pyproject.toml").write_text(f"""\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedmri-app"
version = "1.0.0"
description = "fedmri federated MRI segmentation"
license = "MIT"
dependencies = []

[tool.flwr.app]
publisher = "fedmri"

[tool.flwr.app.components]
serverapp = "{app.serverapp}"
clientapp = "{app.clientapp}"

[tool.flwr.app.config]
{config_lines}
""")
    # The FAB needs one module; the components themselves come from the installed package.
    (app_dir / "fedmri_app.py").write_text('"""fedmri Flower App (components in fedmri)."""\n')
