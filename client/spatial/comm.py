"""Differentiable communication between the ranks of a mesh.

Conventions (each rank runs backward from the same replicated loss):
- `halo_exchange`: the planes a layer needs from its neighbours; backward sends their
  gradients back to the owners, who add them to their boundary planes.
- normalisation statistics (norms.py): their own Function, one all-reduce each way.
- `replica_sum`: a sum over the group that only replicated code consumes (the loss): all-reduce
  forward, identity backward (every rank already holds the whole gradient).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from fedmri.client.spatial.mesh import SpatialMesh
from fedmri.client.spatial.shm import ShmTransport

# The ranks' shared-memory transport, where the worker set one up (CPU ranks of one host);
# else, and for CUDA tensors, torch.distributed (gloo, NCCL).
_shm: ShmTransport | None = None


def use_shared_memory(transport: ShmTransport | None) -> None:
    global _shm
    _shm = transport


def shared_memory() -> bool:
    """Whether this rank's halos and sums go through shared memory."""
    return _shm is not None


class HaloTraffic:
    """Bytes this process has sent in halo exchanges, forward and backward (for benchmarks)."""

    bytes_sent = 0


def _exchange(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]],
              group: dist.ProcessGroup | None) -> None:
    """Batched point-to-point: post every receive and send, then wait for all."""
    HaloTraffic.bytes_sent += sum(t.numel() * t.element_size() for t, _ in sends)
    if _shm is not None and all(t.device.type == "cpu" for t, _ in sends + recvs):
        _shm.exchange(sends, recvs)
        return
    ops = [dist.P2POp(dist.irecv, t, peer, group) for t, peer in recvs]
    ops += [dist.P2POp(dist.isend, t.contiguous(), peer, group) for t, peer in sends]
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()


def all_reduce_sum(t: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """Sum `t` in place over `group` (nothing to do for None)."""
    if group is None:
        return
    if _shm is not None and t.device.type == "cpu":
        ranks = tuple(dist.get_process_group_ranks(group))
        if _shm.covers(ranks):
            _shm.all_reduce(t, ranks)
            return
    dist.all_reduce(t, group=group)


def _planes(x: torch.Tensor, count: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[2] = count
    return torch.empty(shape, dtype=x.dtype, device=x.device)  # standard layout


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mesh: SpatialMesh, lo: int,
                hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Each rank asks for `lo` planes from below and `hi` from above, so it sends its
        # bottom `hi` planes down and its top `lo` planes up.
        ctx.mesh, ctx.lo, ctx.hi = mesh, lo, hi
        below, above = mesh.below, mesh.above
        halo_lo = _planes(x, lo if below is not None else 0)
        halo_hi = _planes(x, hi if above is not None else 0)
        sends, recvs = [], []
        if below is not None:
            recvs += [(halo_lo, below)] if lo else []
            sends += [(x[:, :, :hi], below)] if hi else []
        if above is not None:
            recvs += [(halo_hi, above)] if hi else []
            sends += [(x[:, :, x.shape[2] - lo:], above)] if lo else []
        _exchange(sends, recvs, mesh.tp_group)
        # x passes through so that backward runs on every rank, even where neither halo is
        # used (the first slab of a stride-2 layer): its neighbours wait for its gradients.
        return x.view_as(x), halo_lo, halo_hi

    @staticmethod
    @once_differentiable  # the exchange back is no autograd op: refused, never silently wrong
    def backward(ctx: Any, grad_out: torch.Tensor, grad_lo: torch.Tensor,
                 grad_hi: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        mesh, lo, hi = ctx.mesh, ctx.lo, ctx.hi
        below, above = mesh.below, mesh.above
        depth = grad_out.shape[2]
        sends, recvs = [], []
        # Received into fresh standard-layout buffers: the senders send contiguous copies,
        # whatever the memory format (channels_last) of the gradients here.
        if below is not None:
            sends += [(grad_lo, below)] if lo else []
            recvs += [(_planes(grad_out, hi), below)] if hi else []
        if above is not None:
            sends += [(grad_hi, above)] if hi else []
            recvs += [(_planes(grad_out, lo), above)] if lo else []
        _exchange(sends, recvs, mesh.tp_group)
        # The neighbours' gradients of this rank's boundary planes, added in place: the x
        # returned by forward feeds only the calling layer, whose backward gives it a
        # gradient of its own (copying it cost a split rank a whole activation per exchange).
        for received, peer in recvs:
            if peer == below:
                grad_out[:, :, :hi] += received
            else:
                grad_out[:, :, depth - lo:] += received
        return grad_out, None, None, None


def halo_exchange(x: torch.Tensor, mesh: SpatialMesh, lo: int, hi: int, layer: str = "?"
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(x, the `lo` depth planes just below this rank's slab, the `hi` planes just above it);
    a halo is None at the volume's ends or where 0 planes are asked. Use the x returned (its
    gradient carries the neighbours' halo gradients back). Every rank of the group must call
    it with the same lo and hi, and every slab must hold at least max(lo, hi) planes. The x
    returned must feed only ops whose backward gives it a gradient tensor of its own (not
    one handed on to another input): backward adds the neighbours' planes to it in place."""
    if mesh.tp_size == 1 or lo + hi == 0:
        return x, None, None
    if x.shape[2] < max(lo, hi):
        raise ValueError(f"layer '{layer}' on tp rank {mesh.tp_rank}: a slab of {x.shape[2]} "
                         f"planes cannot give its neighbours {max(lo, hi)} halo planes; use "
                         "fewer ranks or a larger volume (plan_slabs checks this)")
    if not _Sharing.depth:
        return _halos(*_HaloExchange.apply(x, mesh, lo, hi))
    key = (id(mesh), lo, hi, x._version if not x.is_inference() else -1,
           torch.is_grad_enabled(), x.requires_grad)
    last = _Sharing.last
    if last is not None and last[0] is x and last[1] == key:
        return last[2]
    result = _halos(*_HaloExchange.apply(x, mesh, lo, hi))
    _Sharing.last = (x, key, result)
    return result


Halos = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def _halos(x: torch.Tensor, halo_lo: torch.Tensor, halo_hi: torch.Tensor) -> Halos:
    return x, (halo_lo if halo_lo.shape[2] else None), (halo_hi if halo_hi.shape[2] else None)


class _Sharing:
    """Inside a split network's forward (parallelize hooks it), layers that read the same
    tensor right after one another with the same halo (a residual unit's strided shortcut
    and its first convolution) share one exchange, and autograd sums their halo gradients
    before the one exchange back. Every rank runs the same layers on the same tensors, so
    all take the same decision; the last exchange is forgotten when the forward ends."""

    depth = 0  # forwards of split networks under way (one may call another)
    last: tuple[torch.Tensor, tuple[Any, ...], Halos] | None = None  # (read, key, result)


def forward_begins(*_: Any) -> None:
    _Sharing.depth += 1


def forward_ends(*_: Any) -> None:
    _Sharing.depth -= 1
    if not _Sharing.depth:
        _Sharing.last = None  # nothing of this forward's graph is kept


class _ReplicaSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        out = x.clone()
        all_reduce_sum(out, group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return grad, None


def replica_sum(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum over `group` of a partial result that only replicated code (the loss) uses."""
    return x if group is None else _ReplicaSum.apply(x.contiguous(), group)


def plain_sum(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum over `group`, no gradient (counts, metrics)."""
    out = x.detach().clone()
    all_reduce_sum(out, group)
    return out


def slab_depths(depth: int, mesh: SpatialMesh, device: torch.device) -> list[int]:
    """Every tp rank's slab depth at this point of the network (one small all-gather)."""
    if mesh.tp_group is None:
        return [depth]
    mine = torch.tensor([depth], dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(mesh.tp_size)]
    dist.all_gather(every, mine, group=mesh.tp_group)
    return [int(t.item()) for t in every]


def sum_gradients(parameters: list[torch.nn.Parameter], mesh: SpatialMesh) -> None:
    """Sum every parameter's gradient over the whole mesh (one flat all-reduce).

    Each rank's backward holds the contribution of its own slabs and samples: the sum is the
    gradient of the replicated loss."""
    if mesh.world_group is None:
        return
    params = [p for p in parameters if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_sum(flat, mesh.world_group)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
