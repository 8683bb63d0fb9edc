"""Run on every rank of a mesh by tests/test_spatial.py: each rank computes the single-process
reference on the whole batch itself, then its own slab with the split network, and writes the
largest relative errors it sees (outputs, loss, every gradient, parameters after one step)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fedmri.client.spatial import SpatialMesh, parallelize, plan_slabs
from fedmri.client.spatial.comm import sum_gradients
from fedmri.client.spatial.hospital import mesh_device
from fedmri.client.spatial.loss import dice_ce_loss
from fedmri.client.trainer import loss_fn
from fedmri.common.config import RunConfig
from fedmri.common.models import build_model


def rel_err(got: torch.Tensor, want: torch.Tensor, floor: float = 1e-300) -> float:
    scale = want.abs().max().item()
    return (got - want).abs().max().item() / max(scale, floor)


def inert_parameters(model: torch.nn.Module, cfg: RunConfig) -> set[str]:
    """Parameters whose gradient is zero in exact arithmetic (a bias right before an instance
    norm): Adam moves them by lr * sign(rounding noise), and they change no output."""
    probe = build_model(cfg).double()
    probe.load_state_dict(model.state_dict())
    shape = (1, 1, cfg.size, cfg.size, cfg.size)
    x = torch.rand(shape, dtype=torch.float64)
    loss_fn()(probe(x), torch.randint(0, cfg.num_classes, shape)).backward()
    top = max(p.grad.abs().max().item() for p in probe.parameters())
    return {n for n, p in probe.named_parameters() if p.grad.abs().max().item() <= 1e-12 * top}


def assert_same_model(got: dict[str, torch.Tensor], want: torch.nn.Module, cfg: RunConfig,
                      image: torch.Tensor, tolerance: float) -> None:
    """Every parameter that can change an output, and the outputs on `image`, equal within
    `tolerance` (largest difference over the largest value, per tensor)."""
    inert = inert_parameters(want, cfg)
    assert inert and all(n.endswith("bias") for n in inert)
    for name, value in want.state_dict().items():
        if name not in inert and value.is_floating_point():
            err = (got[name] - value).abs().max() / value.abs().max().clamp_min(1e-12)
            assert err <= tolerance, f"{name} differs by {err:.2e}"
    other = build_model(cfg)
    other.load_state_dict(got)
    with torch.no_grad():
        a, b = want.eval()(image), other.eval()(image)
    assert ((a - b).abs().max() / a.abs().max()).item() <= tolerance


def mixed_network() -> torch.nn.Module:
    """Layers the trainer's networks do not use: transposed convolutions that add output
    planes by output_padding alone or take halo planes from below (k 4), a strided conv and
    pooling at upsampled depths,
    trilinear upsampling with aligned corners, group and batch norm (running statistics)."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.ConvTranspose3d(4, 4, 1, stride=2, output_padding=1),
        nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv3d(4, 4, 3, stride=2, padding=1),
        nn.Upsample(scale_factor=2, mode="trilinear", align_corners=True), nn.BatchNorm3d(4),
        nn.ConvTranspose3d(4, 4, 3, stride=2, padding=1, output_padding=1), nn.AvgPool3d(2),
        nn.MaxPool3d(2), nn.PReLU(), nn.ConvTranspose3d(4, 4, 4, stride=2, padding=1),
        nn.AvgPool3d(2), nn.Conv3d(4, 3, 1))


def check(name: str, depth: int, hw: int, batch: int, mesh: SpatialMesh,
          die: bool = False, dtype: torch.dtype = torch.float64,
          channels_last: bool = False) -> dict[str, float]:
    cfg = RunConfig(model=name if name != "mixed" else "unet", num_classes=3)
    dev = mesh_device(mesh)
    torch.manual_seed(7)
    x = torch.rand(batch, 1, depth, hw, hw, dtype=dtype).to(dev)
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d)
    y = torch.randint(0, 3, (batch, 1, depth, hw, hw)).to(dev)

    def build() -> torch.nn.Module:
        if name == "mixed":
            torch.manual_seed(3)
            return mixed_network().to(dev, dtype)
        return build_model(cfg, seed=3).to(dev, dtype)

    ref, model = build(), build()
    out_ref = ref(x)
    loss_ref = loss_fn()(out_ref, y)
    loss_ref.backward()

    slabs = plan_slabs(model, depth, mesh.tp_size, shape=(1, depth, hw, hw))
    parallelize(model, mesh)
    a, b = slabs[mesh.tp_rank]
    if die:  # this rank dies in the middle of the forward pass, its peers mid-exchange
        middle = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)][3]
        middle.register_forward_hook(lambda *_: os._exit(9))
    samples = [i for i in range(batch) if i % mesh.dp_size == mesh.dp_rank]
    out = model(x[samples, :, a:b]) if samples else None
    loss = dice_ce_loss(out, y[samples, :, a:b] if samples else None, mesh, 3, batch,
                        depth * hw * hw, dtype=dtype)
    if out is not None:
        loss.backward()
    sum_gradients(list(model.parameters()), mesh)

    errors = {"loss": rel_err(loss.detach(), loss_ref.detach())}
    if out is not None:
        errors["output"] = rel_err(out.detach(), out_ref.detach()[samples, :, a:b])
    refs = dict(ref.named_parameters())
    # A gradient that is zero in exact arithmetic (a bias right before a normalisation) is
    # rounding noise in both: it is compared against the network's largest gradient instead.
    floor = 1e-3 * max(p.grad.abs().max().item() for p in ref.parameters())
    errors["gradient"] = max(rel_err(p.grad, refs[n].grad, floor)
                             for n, p in model.named_parameters())
    for net in (ref, model):
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        opt.step()
    # Adam's first step is about lr * sign(gradient): rounding noise in a zero gradient moves
    # a bias by up to lr * noise / eps. Compared on the scale of the network's parameters.
    scale = max(p.detach().abs().max().item() for p in ref.parameters())
    errors["step"] = max(rel_err(p.detach(), refs[n].detach(), scale)
                         for n, p in model.named_parameters())
    assert model.state_dict().keys() == ref.state_dict().keys()
    return errors


def run(mesh: SpatialMesh, job_dir: Path) -> None:
    job = json.loads((job_dir / "job.json").read_text())
    dtype = getattr(torch, job.get("dtype", "float64"))
    torch.set_default_dtype(dtype)
    rank = mesh.dp_rank * mesh.tp_size + mesh.tp_rank
    die = job.get("die_rank") == rank
    results = {case["name"]: check(case["name"], case["depth"], case["hw"], job["batch"], mesh,
                                   die, dtype, case.get("channels_last", False))
               for case in job["cases"]}
    (job_dir / f"result{rank}.json").write_text(json.dumps(results))


def noop(mesh: SpatialMesh, job_dir: Path) -> None:
    """A job that only joins the process group (launcher tests)."""


def sleep(mesh: SpatialMesh, job_dir: Path) -> None:
    """A job that outlives its launcher (launcher tests)."""
    import time

    time.sleep(600)


def shm_traffic(mesh: SpatialMesh, job_dir: Path) -> None:
    """Halo exchanges and sums through the transport the launcher set up, against values
    every rank can compute: messages of several chunks both ways at once, and sums of
    several chunks over each group of the mesh, of int64, float64 and non-contiguous
    tensors. job.json may say `"idle_rank": r` (rank r sleeps instead: a peer's timeout),
    `"odd_rank": r` (rank r's last sum is one element longer than its peers') or
    `"odd_halo": r` (so are the halos rank r sends last)."""
    import time

    import torch.distributed as dist

    from fedmri.client.spatial import comm, shm

    job = json.loads((job_dir / "job.json").read_text())
    rank = dist.get_rank()
    if job.get("idle_rank") == rank:
        time.sleep(60)
        return

    def message(src: int, dst: int, numel: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1000 * src + dst + numel)
        return torch.rand(numel, generator=gen, dtype=torch.float64)

    # 2.5 chunks, a small one, and an int64 one, with every neighbour at once, twice.
    sizes = [int(2.5 * shm.CHUNK) // 8, 3, 5]
    for _ in range(2):
        for numel in sizes:
            sends = [(message(rank, p, numel), p) for p in (mesh.below, mesh.above)
                     if p is not None]
            recvs = [(torch.empty(numel, dtype=torch.float64), p) for _, p in sends]
            comm._exchange(sends, recvs, mesh.tp_group)
            for got, peer in recvs:
                assert torch.equal(got, message(peer, rank, numel)), (rank, peer, numel)
    for group in (mesh.tp_group, mesh.dp_group, mesh.world_group):
        if group is None:
            continue
        ranks = dist.get_process_group_ranks(group)
        big = {r: message(r, r, 3 * shm.CHUNK // 8) for r in ranks}
        mine = big[rank].clone()
        comm.all_reduce_sum(mine, group)
        want = big[ranks[0]].clone()
        for r in ranks[1:]:
            want += big[r]
        assert torch.equal(mine, want), f"float64 sum of several chunks over {ranks}"
        strided = (torch.arange(12, dtype=torch.int64).view(3, 4) * (rank + 1)).t()
        comm.all_reduce_sum(strided, group)
        factor = sum(r + 1 for r in ranks)
        assert torch.equal(strided, torch.arange(12).view(3, 4).t() * factor), "int64 sum"
    if "odd_rank" in job:
        comm.all_reduce_sum(torch.ones(4 + (job["odd_rank"] == rank)), mesh.world_group)
    if "odd_halo" in job:
        peers = [p for p in (mesh.below, mesh.above) if p is not None]
        comm._exchange([(torch.ones(3 + (job["odd_halo"] == rank)), p) for p in peers],
                       [(torch.empty(3), p) for p in peers], mesh.tp_group)
    transport = "shm" if comm.shared_memory() else "gloo"
    (job_dir / f"result{rank}.json").write_text(json.dumps({"transport": transport}))


def halo_sharing(mesh: SpatialMesh, job_dir: Path) -> None:
    """Which halo exchanges a split network shares (comm._Sharing), counted on this rank:
    per forward of the trainer's UNet in grad mode, no_grad and inference mode; whether
    anything is held after the forward; and two readers of one tensor that differ in
    requires_grad (the second must exchange again, or its gradient would be lost)."""
    from fedmri.client.spatial import comm

    counted = {"exchanges": 0}
    exchange = comm._exchange

    def counting(*args: object) -> None:
        counted["exchanges"] += 1
        exchange(*args)  # type: ignore[arg-type]

    comm._exchange = counting  # type: ignore[assignment]
    model = build_model(RunConfig(model="unet"))
    parallelize(model, mesh)
    start, stop = plan_slabs(model, 32, mesh.tp_size)[mesh.tp_rank]
    x = torch.rand(1, 1, 32, 16, 16, generator=torch.Generator().manual_seed(0))[:, :, start:stop]
    counts = {}
    for mode, context in (("grad", torch.enable_grad()), ("no_grad", torch.no_grad()),
                          ("inference", torch.inference_mode())):
        counted["exchanges"] = 0
        with context:
            model(x.clone())
        counts[mode] = counted["exchanges"]
    held_after_forward = comm._Sharing.last is not None
    layer = torch.nn.Conv3d(1, 1, 3, padding=1)
    parallelize(layer, mesh)
    y = torch.rand(1, 1, 4, 4, 4)
    comm.forward_begins()
    layer(y)
    y.requires_grad_()
    layer(y).sum().backward()
    comm.forward_ends()
    (job_dir / f"result{mesh.tp_rank}.json").write_text(json.dumps({
        "counts": counts, "held_after_forward": held_after_forward,
        "grad_reached_second_reader": y.grad is not None}))


def second_order_and_cpu_autocast(mesh: SpatialMesh, job_dir: Path) -> None:
    """Second derivatives through each kind of split layer (refused, never silently wrong),
    and the split UNet under CPU bfloat16 autocast against one process under it."""
    from torch import nn

    refused = {}
    for name, layer in (("conv", nn.Conv3d(2, 2, 3, padding=1)),
                        ("norm", nn.InstanceNorm3d(2, affine=True)),
                        ("upsample", nn.Upsample(scale_factor=2, mode="trilinear"))):
        parallelize(layer.double(), mesh)
        x = torch.rand(1, 2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
        try:
            grad.sum().backward()
            refused[name] = ""
        except RuntimeError as err:
            refused[name] = str(err)
    cfg = RunConfig(model="unet")
    reference = build_model(cfg)
    model = build_model(cfg)
    model.load_state_dict(reference.state_dict())
    parallelize(model, mesh)
    start, stop = plan_slabs(model, 32, mesh.tp_size)[mesh.tp_rank]
    image = torch.rand(1, 1, 32, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = reference(image)[:, :, start:stop].float()
        got = model(image[:, :, start:stop].contiguous())
    (job_dir / f"result{mesh.tp_rank}.json").write_text(json.dumps({
        "refused": refused, "dtype": str(got.dtype), "error": rel_err(got.float(), want)}))


def norms_on_strided_slabs(mesh: SpatialMesh, job_dir: Path) -> None:
    """The split norms on channels-last slabs and on depth-narrowed views (their rows reach
    the statistics op as strided views): outputs and input gradients against one process."""
    from torch import nn

    errors = {}
    for name, make in (("batch", lambda: nn.BatchNorm3d(4)), ("instance",
                       lambda: nn.InstanceNorm3d(4, affine=True)),
                       ("group", lambda: nn.GroupNorm(2, 4))):
        for batch, layout in ((2, "channels_last"), (1, "channels_last"), (1, "narrowed")):
            torch.manual_seed(5)
            reference, split = make().double(), make().double()
            split.load_state_dict(reference.state_dict())
            parallelize(split, mesh)
            whole = torch.rand(batch, 4, 8, 5, 3, dtype=torch.float64) * 3 + 1
            start, stop = 4 * mesh.tp_rank, 4 * (mesh.tp_rank + 1)
            want_x = whole.clone().requires_grad_()
            want = reference(want_x)
            (want * torch.arange(want.numel()).view_as(want)).sum().backward()
            if layout == "channels_last":
                leaf = whole[:, :, start:stop].contiguous(
                    memory_format=torch.channels_last_3d).requires_grad_()
                slab = leaf
            else:  # a view into planes around the slab, as a slice of a layer's output
                leaf = torch.nn.functional.pad(whole, (0, 0, 0, 0, 1, 1)).requires_grad_()
                slab = leaf[:, :, 1 + start:1 + stop]
            got = split(slab)
            weights = torch.arange(want.numel()).view_as(want)[:, :, start:stop]
            (got * weights).sum().backward()
            assert leaf.grad is not None and want_x.grad is not None
            grad = leaf.grad if layout == "channels_last" else leaf.grad[:, :, 1 + start:1 + stop]
            errors[f"{name}-{batch}-{layout}"] = max(
                rel_err(got, want[:, :, start:stop]),
                rel_err(grad, want_x.grad[:, :, start:stop]))
    (job_dir / f"result{mesh.tp_rank}.json").write_text(json.dumps(errors))
