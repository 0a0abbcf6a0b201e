"""The ranks of one tensor-parallel engine: the process group, its collectives, and its side channel.

One process per device (`torchrun --nproc-per-node N`): NCCL between GPUs, gloo between CPU processes. Every
collective goes through `TPGroup`, which turns a peer's death (a closed connection, a collective past its timeout)
into `PeerLostError` and remembers it, so that the rank-0 driver can tell a rank that failed from the ranks that
only lost it. The store (the rendezvous key-value server) is the side channel: rank 0's commands travel through it
(an idle follower waits on the store, never inside a collective that would time out), and a failing rank leaves its
report there for rank 0 to name it.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.errors import InvalidSettingsError

# A collective that waits longer than this for a peer raises instead of hanging (tests pass a shorter one).
DEFAULT_TIMEOUT_S = 300.0
STORE_PREFIX = "kvlab-tp/"


class PeerLostError(RuntimeError):
    """A collective failed: another rank died, left, or stopped answering within the timeout."""


@dataclass(frozen=True)
class LaunchSettings:
    """How this process joins the group: by torchrun's environment (rank, world size, rendezvous address) or, in
    tests, by explicit values. device 'auto': cuda:<local rank> when GPUs are visible, else the CPU."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    device: str = "auto"
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise InvalidSettingsError(f"rank {self.rank} is outside a world of {self.world_size} processes: launch "
                                       "with torchrun, which sets RANK and WORLD_SIZE.")
        if self.timeout_s <= 0:
            raise InvalidSettingsError(f"timeout_s={self.timeout_s} must be positive: a collective needs a deadline.")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InvalidSettingsError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}.")

    @classmethod
    def from_env(cls, *, device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> LaunchSettings:
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise InvalidSettingsError(f"{', '.join(missing)} not set: launch tensor parallel with torchrun, e.g. "
                                       "`torchrun --nproc-per-node 2 -m engine.parallel --model synthetic:tiny-llama-tp`.")
        return cls(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                   local_rank=int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
                   master_addr=os.environ["MASTER_ADDR"], master_port=int(os.environ["MASTER_PORT"]),
                   device=device, timeout_s=timeout_s)

    def resolve_device(self) -> torch.device:
        cuda = self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())
        if not cuda:
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise InvalidSettingsError("device 'cuda' was asked for but no CUDA GPU is visible: use device='cpu'.")
        if self.local_rank >= torch.cuda.device_count():
            raise InvalidSettingsError(f"local rank {self.local_rank} has no GPU: this host shows "
                                       f"{torch.cuda.device_count()}; launch at most that many processes per node.")
        return torch.device("cuda", self.local_rank)


class TPGroup:
    """This rank's view of the group: rank, world size, device, collectives and the store."""

    def __init__(self, launch: LaunchSettings):
        self.launch = launch
        self.rank, self.world_size = launch.rank, launch.world_size
        self.device = launch.resolve_device()
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.timeout_s = launch.timeout_s
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if dist.is_initialized():
            raise InvalidSettingsError("a torch.distributed process group is already initialised in this process: "
                                       "one tensor-parallel engine per process.")
        timeout = timedelta(seconds=launch.timeout_s)
        # Under torchrun the agent already serves the rendezvous store at MASTER_ADDR:MASTER_PORT: every rank joins
        # it as a client. Launched otherwise (tests), rank 0 serves it.
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        store = dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size,
                              is_master=launch.rank == 0 and not agent_store, timeout=timeout)
        dist.init_process_group(self.backend, store=store, rank=launch.rank, world_size=launch.world_size,
                                timeout=timeout, device_id=self.device if self.device.type == "cuda" else None)
        self.store = dist.PrefixStore(STORE_PREFIX, store)
        self.peer_lost = False  # set by the first collective that failed; the group is unusable from then on
        self.all_reduce_calls = 0
        self.all_reduce_bytes = 0  # payload this rank contributed to all-reduces and all-gathers
        self.closed = False
        self._engines = 0  # engines made over this group: each rank makes them in the same order

    def next_engine_id(self) -> int:
        """A name for the next engine over this group (the same on every rank): its keys in the store."""
        self._engines += 1
        return self._engines

    # -- collectives ---------------------------------------------------------------------------------------
    def _collective(self, what: str, fn):
        if self.closed:
            raise PeerLostError(f"rank {self.rank}: the process group is closed ({what})")
        try:
            return fn()
        except (RuntimeError, dist.DistError) as exc:
            self.peer_lost = True
            detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise PeerLostError(f"rank {self.rank} lost its peers during {what}: {detail}") from None

    def all_reduce_(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place."""
        self.all_reduce_calls += 1
        self.all_reduce_bytes += tensor.numel() * tensor.element_size()
        self._collective("an all-reduce", lambda: dist.all_reduce(tensor, op=op))
        return tensor

    def all_gather_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """(..., n) on every rank -> (..., world_size * n): the ranks' pieces side by side in rank order."""
        self.all_reduce_bytes += tensor.numel() * tensor.element_size()
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._collective("an all-gather", lambda: dist.all_gather(parts, tensor))
        return torch.cat(parts, dim=-1)

    def broadcast_(self, tensor: torch.Tensor, *, src: int = 0) -> torch.Tensor:
        self._collective("a broadcast", lambda: dist.broadcast(tensor, src=src))
        return tensor

    def agree(self, ok: bool) -> bool:
        """True when every rank says ok (a MIN over the ranks' flags)."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.device)
        self._collective("the ranks' agreement to start", lambda: dist.all_reduce(flag, op=dist.ReduceOp.MIN))
        return bool(flag.item())

    def gather_objects(self, obj) -> list:
        """Every rank's picklable `obj`, in rank order, on every rank."""
        out = [None] * self.world_size
        self._collective("the ranks' exchange of outcomes", lambda: dist.all_gather_object(out, obj))
        return out

    def barrier(self) -> None:
        self._collective("a barrier", lambda: dist.barrier())

    # -- the side channel ----------------------------------------------------------------------------------
    def put(self, key: str, obj) -> None:
        self.store.set(key, pickle.dumps(obj))

    def take(self, key: str, *, timeout_s: float) -> object:
        """The object under `key`, waiting up to timeout_s for it to appear (TimeoutError past it). The wait is
        the store server's: no polling, no collective."""
        try:
            self.store.wait([key], timedelta(seconds=timeout_s))
            return pickle.loads(self.store.get(key))
        except dist.DistStoreError as exc:
            if "timeout" in str(exc).lower():
                raise TimeoutError(f"nothing under {key!r} after {timeout_s:.0f} s") from None
            raise PeerLostError(f"rank {self.rank} lost the rendezvous store: {str(exc)[:200]}") from None
        except (RuntimeError, dist.DistError) as exc:
            raise PeerLostError(f"rank {self.rank} lost the rendezvous store: {str(exc)[:200]}") from None

    def drop(self, key: str) -> None:
        try:
            self.store.delete_key(key)
        except (RuntimeError, dist.DistError):
            pass  # a key that outlives its command costs a few bytes in the store

    def has(self, key: str) -> bool:
        try:
            return bool(self.store.check([key]))
        except (RuntimeError, dist.DistError):
            return False

    def close(self) -> None:
        """Leave the group (idempotent). Peers still inside a collective with this rank get an error, not a hang."""
        if self.closed:
            return
        self.closed = True
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except (RuntimeError, dist.DistError):
                pass  # a broken group cannot be torn down politely; leaving the process frees it anyway
