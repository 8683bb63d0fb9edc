"""fedmri.proto: the contract between fedmri's processes.

Everything that crosses a process boundary is named here, once: the Flower message record
keys (`wire`), the SuperNode's node config (`node_config.NodeConfig`), the ServerApp's run
config (`run_config.ServerSettings`; the training recipe is fedmri.common.config.RunConfig),
the event log (`events`), the per-round record (`report`) and the names of the files a run
writes (`files`). Imports nothing of fedmri outside this package.
"""
