"""Several processes on PyTorch's own engine: ``torchrun`` starts them, this module joins them.

``torchrun --nproc_per_node N -m pathar_aug train ...`` (or ``synthesize``) starts N copies of the
command with ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` in their environment;
several machines join through torchrun's rendezvous (``--nnodes``, ``--rdzv-endpoint``). Each
process calls ``init`` once: it joins the process group (NCCL on CUDA, gloo on the CPU) and gets
its own device, ``cuda:LOCAL_RANK``. Without torchrun every helper here is the single-process
identity, so library code calls them unconditionally.

Conventions the training loops and the synthesis follow:

* the configured batch size is the *global* batch: every rank draws the same batch indices from
  the same seeded generator and takes its contiguous block (``rank_block``), so the global batch is
  the single-process batch; DistributedDataParallel averages the gradients of equal blocks, so an
  update is the single-process update on the global batch, at the configured learning rate;
* random draws inside the model (label dropout, dropout, appearance shuffling) use per-rank seeds
  (``rank_seed``): rank 0 keeps the single-process stream, the others get their own;
* rank 0 alone writes logs, checkpoints and datasets (``is_main``); the others wait at ``barrier``.
"""
from __future__ import annotations

import datetime
import os
import pickle
from typing import Any

import torch
import torch.distributed as dist

# Rank 0 works alone between the distributed stages (the token cache, the quality filter); the
# others wait at a barrier, which must outlast it.
TIMEOUT = datetime.timedelta(hours=6)


def launched() -> bool:
    """True in a process started by torchrun with more than one process in the job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def main_process() -> bool:
    """Rank 0 of the job, or a single process: also before ``init`` and after ``shutdown``."""
    return (rank() if active() else int(os.environ.get("RANK", "0")) if launched() else 0) == 0


def init(device: torch.device) -> torch.device:
    """Join the process group torchrun set up (a no-op without torchrun); returns this rank's device.

    ``device`` is the device asked for (``--device``): a CUDA device becomes ``cuda:LOCAL_RANK``
    (one GPU per process, NCCL), the CPU stays the CPU (gloo)."""
    if not launched():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                             "start at most that many processes per machine (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=TIMEOUT, **kwargs)
    return device


def shutdown() -> None:
    """Leave the process group once every rank is done (call it on success only: after an error the
    process just exits, and torchrun stops the other ranks)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank closes its connections while another still works
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def rank_seed(seed: int, rank_: int | None = None) -> int:
    """Seed of a rank's own random draws: rank 0 keeps ``seed`` (the single-process stream)."""
    r = rank() if rank_ is None else rank_
    return seed if r == 0 else seed + 1_000_003 * r


def rank_block(global_batch: int) -> slice:
    """This rank's rows of a global batch: a contiguous block, the same size on every rank."""
    n = world()
    if global_batch % n:
        raise ValueError(f"the batch size {global_batch} is the global batch and must split evenly over "
                         f"{n} processes; choose a multiple of {n} (--batch-size)")
    size = global_batch // n
    return slice(rank() * size, (rank() + 1) * size)


def all_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a small tensor (a copy; float64 for the logs)."""
    if not active():
        return values
    out = values.detach().to(_collective_device(), torch.float64).clone()
    dist.all_reduce(out)
    return (out / world()).to(values.device)


def all_max(values: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum over ranks (a copy)."""
    if not active():
        return values
    out = values.detach().to(_collective_device()).clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.to(values.device)


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """The rows of every rank concatenated in rank order (every rank gives the same shape)."""
    if not active():
        return rows
    local = rows.detach().to(_collective_device()).contiguous()
    parts = [torch.empty_like(local) for _ in range(world())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(rows.device)


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s."""
    if active():
        moved = tensor.detach().to(_collective_device()).contiguous()
        dist.broadcast(moved, src)
        tensor.copy_(moved.to(tensor.device))
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable object, on every rank."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src, device=_collective_device())
    return box[0]


def gather_object(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's picklable object, in rank order, on rank ``dst`` (None elsewhere).

    Sent as one byte tensor per rank through the process group (gloo or NCCL alike), so no rank
    needs to see another machine's files."""
    if not active():
        return [obj]
    device = _collective_device()
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
    sizes = all_gather_rows(torch.tensor([data.numel()], dtype=torch.long, device=device))
    longest = int(sizes.max())
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:data.numel()] = data
    parts = [torch.empty_like(padded) for _ in range(world())] if rank() == dst else None
    dist.gather(padded, parts, dst=dst)
    if rank() != dst:
        return None
    return [pickle.loads(p[:int(n)].cpu().numpy().tobytes()) for p, n in zip(parts, sizes.tolist())]


def _collective_device() -> torch.device:
    """Where tensors of a collective live: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reporter_of(reporter, progress: bool = True):
    """(reporter, progress) of a rank: rank 0's as given; the others log nothing and draw no bar."""
    if main_process():
        return reporter, progress
    from pathar_aug.reporter import Reporter

    return Reporter(lambda text: None).without_progress(), False


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` under DistributedDataParallel when several processes train, else itself.

    Buffers are not broadcast every step: the only ones that change in training (the quantisers'
    code statistics) are kept equal on all ranks by the quantisers themselves."""
    if not active():
        return module
    from torch.nn.parallel import DistributedDataParallel

    import inspect

    ids = [device.index] if device.type == "cuda" else None
    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
    return DistributedDataParallel(module, device_ids=ids, **no_sync)
