"""fedmri.proto, the contract between processes: typed configs, events, and that no other
module spells a name that crosses a process boundary by hand."""

from __future__ import annotations

import ast
import json
from dataclasses import fields
from pathlib import Path

import pytest

from fedmri.proto import events, files, wire
from fedmri.proto.node_config import NodeConfig
from fedmri.proto.run_config import ServerSettings
from fedmri.proto.typed_config import ConfigError

REPO = Path(__file__).resolve().parents[1]
RUNTIME_ROOMS = ("server", "client", "common", "deploy", "kernels")


def test_node_config_round_trips_and_names_bad_keys() -> None:
    node = NodeConfig(hospital="hospital-1", data_path=Path("/data/h1"), threads=2, tp=2,
                      state_dir=Path("/var/lib/fedmri"))
    record = node.to_node_config()
    assert record == {"hospital": "hospital-1", "data-path": "/data/h1", "threads": 2,
                      "tp": 2, "dp": 1, "state-dir": "/var/lib/fedmri"}
    assert NodeConfig.from_mapping(record) == node
    assert node.to_node_config_arg() == ('hospital="hospital-1" data-path="/data/h1" '
                                         'threads=2 tp=2 dp=1 state-dir="/var/lib/fedmri"')
    with pytest.raises(ConfigError, match=r"'tp' must be greater than 0, got 0"):
        NodeConfig.from_mapping({"hospital": "h", "tp": 0})
    with pytest.raises(ConfigError, match=r"SuperNode 4: missing 'hospital'"):
        NodeConfig.from_mapping({"data-path": "/x"}, node_id=4)
    with pytest.raises(ConfigError, match=r"SuperNode 4: 'threads' must be int, got 'many'"):
        NodeConfig.from_mapping({"hospital": "h", "threads": "many"}, node_id=4)
    with pytest.raises(ConfigError, match=r"'threads' must be int, got 2.5"):
        NodeConfig.from_mapping({"hospital": "h", "threads": 2.5})
    with pytest.raises(ConfigError, match=r"hospital h: secure aggregation needs 'identity-key'"):
        NodeConfig(hospital="h").require("identity_key", "secure aggregation")


def test_server_settings_defaults_types_and_errors() -> None:
    settings = ServerSettings.from_run_config({"out-dir": "/runs/a", "min-nodes": 3,
                                               "round-timeout-s": 10, "model": "unet"})
    assert settings.out_dir == Path("/runs/a") and settings.min_nodes == 3
    assert settings.round_timeout_s == 10.0 and settings.pinned_keys is None
    assert ServerSettings.from_run_config(settings.to_run_config()) == settings
    with pytest.raises(ConfigError, match=r"run config: 'min-nodes' must be int, got True"):
        ServerSettings.from_run_config({"min-nodes": True})


def test_events_round_trip_through_the_log(tmp_path: Path) -> None:
    path = tmp_path / files.EVENTS
    log, tail = events.EventLog(path), events.EventTail(path)
    sent: list[events.Event] = [
        events.Started(3, 1), events.RoundDone(1, 2.5, 3, 0, {"hospital-1": 0.4}),
        events.SecureSum(1, ["hospital-1", "hospital-2"], 1e-6), events.Done(1)]
    for event in sent[:2]:
        log(event)
    assert tail.read() == sent[:2]
    for event in sent[2:]:
        log(event)
    assert tail.read() == sent[2:] and tail.read() == []
    assert all("time" in json.loads(line) for line in path.read_text().splitlines())
    with pytest.raises(ValueError, match="unknown event 'exploded'"):
        events.decode({"event": "exploded"})
    with pytest.raises(ValueError, match="malformed round_done"):
        events.decode({"event": "round_done", "round": 1})


def _contract_names() -> set[str]:
    """Every name proto defines that is distinctive enough to be searched for (a bare word
    such as "round" is also an ordinary JSON field)."""
    names = {v for module in (wire, files) for k, v in vars(module).items()
             if k.isupper() and isinstance(v, str)}
    names |= set(events.EVENTS)
    for cls in (NodeConfig, ServerSettings):
        names |= {f.metadata["key"] for f in fields(cls)}
    return {n for n in names if any(c in n for c in "-_.")}


def _literals(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and id(node) not in docstrings}


def test_no_contract_name_is_spelled_outside_proto() -> None:
    names = _contract_names()
    assert {"num-examples", "data-path", "round_done", "server_state.json"} <= names
    found = {f"{path.relative_to(REPO)}: {literal!r}"
             for room in RUNTIME_ROOMS for path in sorted((REPO / room).rglob("*.py"))
             for literal in _literals(path) & names}
    assert not found, "spell these through fedmri.proto:\n" + "\n".join(sorted(found))


def test_weights_travel_as_one_array_and_come_back_exactly() -> None:
    import torch
    from flwr.app import RecordDict

    from fedmri.common.config import RunConfig
    from fedmri.common.models import build_model
    from fedmri.proto import weights

    state = build_model(RunConfig(size=16, conv_backend="aten")).state_dict()
    state["flag"] = torch.tensor([True, False])
    state["empty"] = torch.zeros(0, 3, dtype=torch.float64)
    records = weights.pack(state)
    assert len(records[wire.ARRAYS]) == 1  # one Flower object for all tensors
    back = weights.unpack(RecordDict(records))
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


@pytest.mark.parametrize(("index", "match"), [
    ("not json", "do not decode"),
    ('{"a": 1}', "not a list"),
    ('[["w", "|O", [2]]]', "bad entry"),
    ('[["w", "<f4", [-1]]]', "bad entry"),
    ('[["w", "<f4", [true]]]', "bad entry"),
    ('[["w", "<f4", [1]], ["w", "<f4", [1]]]', "twice"),
    ('[["w", "<f4", [3]]]', "accounts for 12 bytes, the packed array holds 8"),
])
def test_hostile_weights_are_refused_saying_what(index: str, match: str) -> None:
    import torch
    from flwr.app import ConfigRecord, RecordDict

    from fedmri.proto import weights

    records = weights.pack({"w": torch.zeros(2)})
    records[wire.WEIGHTS_INDEX] = ConfigRecord({weights.INDEX: index})
    with pytest.raises(ValueError, match=match):
        weights.unpack(RecordDict(records))
    with pytest.raises(ValueError, match="carries no weights"):
        weights.unpack(RecordDict({wire.ARRAYS: records[wire.ARRAYS]}))


def _packed_with(data: bytes) -> object:
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from fedmri.proto import weights

    return RecordDict({wire.ARRAYS: ArrayRecord({weights.PACKED: Array(
        dtype="uint8", shape=(len(data),), stype="numpy.ndarray", data=data)}),
        wire.WEIGHTS_INDEX: ConfigRecord({weights.INDEX: '[["w", "<f4", [2]]]'})})


@pytest.mark.parametrize(("data", "match"), [
    (b"", "do not decode"),
    (b"PK\x03\x04" + bytes(60), "do not decode"),  # a zip, which np.load would open
    # a header declaring 2^45 bytes: refused before anything is allocated
    (b"\x93NUMPY\x01\x00v\x00{'descr': '|u1', 'fortran_order': False, 'shape': (35184372088832,), }"
     .ljust(128 + 8, b" ")[:127 + 8] + b"\n", "declares"),
])
def test_crafted_packed_bytes_are_a_clear_refusal(data: bytes, match: str) -> None:
    from fedmri.proto import weights

    with pytest.raises(ValueError, match=match):
        weights.unpack(_packed_with(data))  # type: ignore[arg-type]


def test_a_deeply_nested_or_huge_index_is_a_clear_refusal() -> None:
    import torch
    from flwr.app import ConfigRecord, RecordDict

    from fedmri.proto import weights

    records = weights.pack({"w": torch.zeros(2)})
    for index in ("[" * 100_000 + "]" * 100_000, " " * (weights.MAX_INDEX_CHARS + 1)):
        records[wire.WEIGHTS_INDEX] = ConfigRecord({weights.INDEX: index})
        with pytest.raises(ValueError):
            weights.unpack(RecordDict(records))
