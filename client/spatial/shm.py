"""Halo exchanges and sums between the CPU ranks of one host, through shared memory.

Why not gloo: its point-to-point and all-reduce go through sockets, and a rank blocked in
gloo's wait() sleeps; on a small VM it woke up to 3-4 ms after its neighbour's message had
arrived, and a training step at 128^3 has about 25 halo exchanges and 20 reductions
(docs/spatial-parallelism.md). Here a waiting rank watches a counter in shared memory:
it spins while it has a core of its own, and yields the core otherwise.

Each rank owns one file in a private folder (on /dev/shm, made by the launcher). In it:
counters, each on a cache line of its own and written by the owner only (release stores
after the data they announce, acquire loads: fedmri.kernels' shm ops), one slot of CHUNK
bytes per tp neighbour for the halo planes it sends, and one per reduction group it belongs
to for its share of a sum. Messages longer than a slot go in chunks, each announced by
counting it and freed by the reader counting it taken.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

CHUNK = 1 << 20  # bytes per slot
LINE = 8  # int64 counters per cache line (64 bytes)
PAGE = 4096
SPINS = 1024  # counter reads per call of the spinning wait (tens of microseconds)
SPIN_S = 0.05  # then yield and sleep: the peer is slow or stuck, leave the core alone
BELOW, ABOVE = 0, 1
# A message's size and dtype, published beside the counter that announces it: a rank that
# expects another size or dtype gets an error, never the rest of an older message.
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
           torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64,
           torch.complex128]


class ShmTimeout(TimeoutError):
    """A neighbour did not send or sum in time; the message names it."""


def signature(t: torch.Tensor) -> int:
    code = _DTYPES.index(t.dtype) + 1 if t.dtype in _DTYPES else 0
    return (t.numel() * t.element_size()) * 32 + code


def describe(sig: int) -> str:
    code = sig % 32  # a faulty peer may publish any number
    known = 0 < code <= len(_DTYPES)
    return f"{sig // 32} bytes of {_DTYPES[code - 1] if known else 'another dtype'}"


def groups_of(groups: list[tuple[int, ...]], rank: int) -> list[tuple[int, ...]]:
    """The groups `rank` sums over, in the mesh's order: its file's slots, in that order."""
    return [ranks for ranks in groups if rank in ranks]


def layout(groups: int) -> tuple[int, int]:
    """(header bytes, file bytes) of a rank's file with `groups` reduction groups. Counters:
    sent down, sent up, taken from below, taken from above, then per group ready and done."""
    header = -(-(4 + 2 * groups) * LINE * 8 // PAGE) * PAGE
    return header, header + (2 + groups) * CHUNK


class _Backoff:
    """How a rank waits for a counter: spin while it has a core of its own, else yield; give
    up after `timeout_s` with a message that says what it was waiting for."""

    def __init__(self, spin: bool, timeout_s: float, what: Callable[[], str]) -> None:
        self.spin, self.timeout_s, self.what = spin, timeout_s, what  # what: built on timeout
        self.start = time.perf_counter()

    def spins(self) -> int:
        return SPINS if self.spin and time.perf_counter() - self.start < SPIN_S else 0

    def pause(self) -> None:
        waited = time.perf_counter() - self.start
        if waited > self.timeout_s:
            raise ShmTimeout(f"{self.what()}: nothing within {self.timeout_s:.0f} s")
        if self.spin and waited < SPIN_S:
            return  # spin on: the core is this rank's own
        if waited < 1e-3:
            os.sched_yield()  # let a peer on this core run
        else:
            time.sleep(1e-4 if waited < SPIN_S else 1e-3)


class ShmTransport:
    """Point-to-point halo exchange with the tp neighbours and sums over the mesh's groups,
    for rank `rank` of a dp x tp mesh whose ranks all run on this host."""

    def __init__(self, folder: Path, rank: int, tp: int, groups: list[tuple[int, ...]],
                 spin: bool, timeout_s: float) -> None:
        self.rank, self.spin, self.timeout_s = rank, spin, timeout_s
        self.groups = groups
        self.neighbours = {BELOW: rank - 1 if rank % tp else None,
                           ABOVE: rank + 1 if rank % tp < tp - 1 else None}
        peers = {p for p in self.neighbours.values() if p is not None}
        peers |= {p for ranks in groups if rank in ranks for p in ranks}
        self.ctr: dict[int, torch.Tensor] = {}
        self.data: dict[int, torch.Tensor] = {}
        for p in sorted(peers | {rank}):
            header, size = layout(len(groups_of(groups, p)))
            mapped = torch.from_file(str(folder / f"rank{p}"), shared=True, size=size,
                                     dtype=torch.uint8)
            self.ctr[p], self.data[p] = mapped[:header].view(torch.int64), mapped[header:]
        self.sent = [0, 0]  # chunks this rank sent down / up
        self.taken = [0, 0]  # chunks it took from below / above
        self.rounds = {ranks: 0 for ranks in groups_of(groups, rank)}
        self.direction = {peer: d for d, peer in self.neighbours.items() if peer is not None}
        # Per group, as shm_sum takes them: each member's counters, the word offset of its
        # `ready` counter in them, its share slot; in rank order, as the group lists its ranks.
        self.members = {ranks: ([self.ctr[p] for p in ranks],
                                [self._group_counter(p, ranks) * LINE for p in ranks],
                                [self._slot(p, 2 + groups_of(groups, p).index(ranks))
                                 for p in ranks]) for ranks in self.rounds}

    # -- counters ------------------------------------------------------------------------------
    def _store(self, index: int, value: int) -> None:
        torch.ops.fedmri.shm_store(self.ctr[self.rank], index * LINE, value)

    def _reached(self, peer: int, index: int, target: int, backoff: _Backoff) -> bool:
        seen = torch.ops.fedmri.shm_wait(self.ctr[peer], index * LINE, target, backoff.spins())
        return bool(seen >= target)

    def _wait_group(self, ranks: tuple[int, ...], done: bool, target: int) -> None:
        """Until every member's ready (or done) counter of this group reaches target."""
        backoff = None
        for peer, offset in zip(ranks, self.members[ranks][1], strict=True):
            index = offset // LINE + done
            if torch.ops.fedmri.shm_wait(self.ctr[peer], index * LINE, target, 0) >= target:
                continue
            def what(peer: int = peer) -> str:
                return f"rank {self.rank}: sum over ranks {list(ranks)}, waiting for rank {peer}"

            if backoff is None:
                backoff = _Backoff(self.spin, self.timeout_s, what)
            backoff.what = what
            while not self._reached(peer, index, target, backoff):
                backoff.pause()

    def _mismatch(self, peer: int, index: int, sig: int, what: str) -> None:
        """Raise: the peer's message (counter `index`) is not the size or dtype expected."""
        theirs = int(self.ctr[peer][index * LINE + 1])
        raise ValueError(f"rank {self.rank}: {what}: rank {peer} sent {describe(theirs)}, "
                         f"this rank has {describe(sig)}")

    def _slot(self, owner: int, slot: int) -> torch.Tensor:
        return self.data[owner][slot * CHUNK:(slot + 1) * CHUNK]

    # -- halo exchange -------------------------------------------------------------------------
    def exchange(self, sends: list[tuple[torch.Tensor, int]],
                 recvs: list[tuple[torch.Tensor, int]]) -> None:
        """Send and receive with the tp neighbours (global ranks), all at once: chunks go
        whenever the peer has taken the previous one, so long messages both ways never
        wait on each other."""
        for kind, pairs in (("sends", sends), ("receives", recvs)):
            if len({p for _, p in pairs}) != len(pairs):  # they would share one slot
                raise ValueError(f"rank {self.rank}: two halo {kind} with one neighbour in "
                                 "one exchange")
        steps = [self._send(t, self._direction(p)) for t, p in sends]
        steps += [self._recv(t, self._direction(p)) for t, p in recvs]
        def what() -> str:
            peers = ", ".join(str(p) for p in sorted({p for _, p in sends + recvs}))
            return f"rank {self.rank}: halo exchange with rank(s) {peers}"

        backoff = _Backoff(self.spin, self.timeout_s, what)
        while steps:
            moved = False
            for step in list(steps):
                try:
                    moved |= next(step)
                except StopIteration:
                    steps.remove(step)
                    moved = True
            if moved:
                backoff = _Backoff(self.spin, self.timeout_s, backoff.what)
            elif steps:
                backoff.pause()

    def _direction(self, peer: int) -> int:
        if peer not in self.direction:
            raise ValueError(f"rank {peer} is not a tp neighbour of rank {self.rank}")
        return self.direction[peer]

    def _send(self, tensor: torch.Tensor, direction: int) -> Iterator[bool]:
        peer = self.neighbours[direction]
        assert peer is not None
        sig, mine = signature(tensor), self._slot(self.rank, direction)
        for part in _chunks(tensor.contiguous()):
            # The peer takes from its side facing us: from below if we send up.
            while not self._reached(peer, 2 + (1 - direction), self.sent[direction], _NO_SPIN):
                yield False
            torch.ops.fedmri.shm_publish(self.ctr[self.rank], direction * LINE,
                                         self.sent[direction] + 1, sig, mine, part)
            self.sent[direction] += 1
            yield True

    def _recv(self, tensor: torch.Tensor, direction: int) -> Iterator[bool]:
        peer = self.neighbours[direction]
        assert peer is not None
        if not tensor.is_contiguous():
            raise ValueError(f"rank {self.rank}: a halo is received into a contiguous tensor")
        sig, theirs = signature(tensor), self._slot(peer, 1 - direction)
        for part in _chunks(tensor):
            # The peer sends to us up if it is below us.
            while True:
                taken = torch.ops.fedmri.shm_take(
                    self.ctr[peer], (1 - direction) * LINE, self.taken[direction] + 1, sig,
                    theirs, part, self.ctr[self.rank], (2 + direction) * LINE)
                if taken:
                    break
                yield False
            if taken < 0:
                self._mismatch(peer, 1 - direction, sig, "halo exchange")
            self.taken[direction] += 1
            yield True

    # -- sums ----------------------------------------------------------------------------------
    def covers(self, ranks: tuple[int, ...]) -> bool:
        return ranks in self.rounds

    def all_reduce(self, tensor: torch.Tensor, ranks: tuple[int, ...]) -> None:
        """Sum `tensor` in place over `ranks` (a group given at set-up). Every rank adds the
        shares in rank order, so all hold the same bits, as the replicated loss needs."""
        flat = tensor.view(-1) if tensor.is_contiguous() else tensor.contiguous().view(-1)
        per_chunk = CHUNK // flat.element_size()
        counters, offsets, slots = self.members[ranks]
        me = ranks.index(self.rank)
        ready, mine = offsets[me] // LINE, slots[me]
        sig = signature(tensor)
        for start in range(0, flat.numel(), per_chunk):
            part = flat[start:start + per_chunk]
            round_ = self.rounds[ranks] + 1
            # Everyone has read this rank's share of the last round.
            self._wait_group(ranks, True, round_ - 1)
            torch.ops.fedmri.shm_publish(self.ctr[self.rank], ready * LINE, round_, sig, mine,
                                         part)
            self._wait_group(ranks, False, round_)
            failed = torch.ops.fedmri.shm_sum(part, counters, offsets, slots, round_, sig)
            if failed:
                self._mismatch(ranks[-1 - failed], offsets[-1 - failed] // LINE, sig, "sum")
            self._store(ready + 1, round_)
            self.rounds[ranks] = round_
        if flat.data_ptr() != tensor.data_ptr():
            tensor.copy_(flat.view_as(tensor))

    def _group_counter(self, owner: int, ranks: tuple[int, ...]) -> int:
        """The owner's `ready` counter for this group (`done` is the next); its own groups
        are the mesh's groups that hold it, in order, so the index differs between owners."""
        return 4 + 2 * groups_of(self.groups, owner).index(ranks)


class _NoSpin(_Backoff):
    """One look at a counter (the exchange's progress loop does the waiting)."""

    def __init__(self) -> None:
        super().__init__(False, 0.0, str)


_NO_SPIN = _NoSpin()


def _chunks(tensor: torch.Tensor) -> list[torch.Tensor]:
    """A contiguous tensor as the pieces that fit a slot (itself, mostly; none if empty)."""
    if 0 < tensor.numel() * tensor.element_size() <= CHUNK:
        return [tensor]
    data = tensor.reshape(-1).view(torch.uint8)
    return [data[start:start + CHUNK] for start in range(0, data.numel(), CHUNK)]


def create_file(folder: Path, rank: int, groups: list[tuple[int, ...]]) -> None:
    """This rank's file, its pages reserved now: a full /dev/shm fails here, with a clear
    error, rather than killing the rank (SIGBUS) when it first writes a page."""
    fd = os.open(folder / f"rank{rank}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, layout(len(groups_of(groups, rank)))[1])
    finally:
        os.close(fd)


def mesh_groups(dp: int, tp: int) -> list[tuple[int, ...]]:
    """Every group a dp x tp mesh sums over (init_mesh's tp, dp and world groups), in one
    order on every rank."""
    world = dp * tp
    groups = {tuple(range(g * tp, (g + 1) * tp)) for g in range(dp)}
    groups |= {tuple(range(t, world, tp)) for t in range(tp)}
    groups.add(tuple(range(world)))
    return sorted(ranks for ranks in groups if len(ranks) > 1)


def connect(folder: Path, rank: int, dp: int, tp: int, spin: bool,
            timeout_s: float) -> ShmTransport | None:
    """The shared-memory transport of this rank, or None (with a warning) where any rank
    could not make its file: then every rank stays on gloo. Collective over the default
    (gloo) process group, which is also the barrier before the ranks map each other's files."""
    import torch.distributed as dist

    from fedmri.kernels import ops

    groups = mesh_groups(dp, tp)
    mine = folder / f"rank{rank}"
    reason = ""
    try:
        ops.load()  # the counters' atomic loads and stores
        create_file(folder, rank, groups)
    except (OSError, RuntimeError) as err:
        reason = str(err) if isinstance(err, RuntimeError) else f"{mine}: {err}"
    made = torch.tensor([0 if reason else 1])
    dist.all_reduce(made, op=dist.ReduceOp.MIN)
    if not made.item():
        mine.unlink(missing_ok=True)
        print(f"fedmri rank {rank}: no shared memory for the halo exchanges "
              f"({reason or 'another rank failed'}); they go through gloo (slower)",
              file=sys.stderr, flush=True)
        return None
    transport = ShmTransport(folder, rank, tp, groups, spin, timeout_s)
    # Once every rank has mapped the files, their names can go: the memory lives as long as
    # the ranks do, and nothing is left in /dev/shm when a launcher is killed.
    dist.barrier()
    mine.unlink()
    return transport
