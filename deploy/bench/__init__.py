"""fedmri's benchmarks (`fedmri bench NAME`): each compares against a named baseline in the
same run and prints JSON. secagg: plain FedAvg vs Flower's SecAgg+ vs ours; quality: FedAvg vs
central and local-only training; trainer: a training step on ATen vs fedmri convolutions.
The per-layer kernel bench lives with the kernels (fedmri.kernels.bench)."""
