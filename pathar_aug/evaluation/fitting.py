"""What the evaluation's small networks share: the one training loop, the fingerprint, the file."""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..reporter import Reporter
from ..training import make_adamw, save_checkpoint


# what configures every small network here; each network has its own defaults (``net_config``)
NET_CONFIG_FIELDS = ("image_size", "crop", "width", "steps", "batch_size", "lr", "weight_decay", "val_fraction", "seed")


def net_config(name: str, doc: str, module: str, **defaults: Any) -> type:
    """A frozen config dataclass with the ``NET_CONFIG_FIELDS``, given defaults for every one:
    patches are resized to ``image_size`` and trained on random ``crop`` crops for ``steps`` steps
    of ``batch_size``; ``width`` sizes the network; ``val_fraction`` of the pairs is held out."""
    if sorted(defaults) != sorted(NET_CONFIG_FIELDS):
        raise TypeError(f"{name} needs a default for each of {', '.join(NET_CONFIG_FIELDS)}")
    fields = [(k, type(defaults[k]), dataclasses.field(default=defaults[k])) for k in NET_CONFIG_FIELDS]
    cls = dataclasses.make_dataclass(name, fields, frozen=True, namespace={"__doc__": doc})
    cls.__module__ = module
    return cls


def train_steps(net: nn.Module, loss_of_batch: Callable[[torch.Generator], torch.Tensor], steps: int, lr: float,
                weight_decay: float, pct_start: float, seed: int, reporter: Reporter, name: str) -> None:
    """AdamW under a one-cycle schedule for ``steps`` steps; ``loss_of_batch(gen)`` draws a batch with
    ``gen`` (seeded by ``seed``) and returns its loss. The network is left in eval mode."""
    opt = make_adamw(net, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=pct_start)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    with reporter.task(name, total=steps) as task:
        for _ in range(steps):
            loss = loss_of_batch(gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            task.advance(1, info=f"loss {loss.item():.3f}")
    net.eval()


def fingerprint(net: nn.Module, salt: bytes) -> str:
    """A short hash of the weights (and ``salt``): caches keyed by it follow the network."""
    h = hashlib.sha256(salt)
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_net(path: str | Path, net: nn.Module, **extra: Any) -> None:
    """Store the weights and ``extra`` (config, scores) in one file, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(extra)
    state["state_dict"] = {k: v.cpu() for k, v in net.state_dict().items()}
    save_checkpoint(path, **state)
