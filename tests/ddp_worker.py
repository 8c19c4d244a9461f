"""Trains the tiny tokenizer and prior a few steps, for tests/test_distributed.py.

    python tests/ddp_worker.py OUT STEPS [--resume] [--adversarial N]   one process
    torchrun --nproc_per_node 2 tests/ddp_worker.py OUT STEPS          DistributedDataParallel (gloo, CPU)

With ``--adversarial N`` the tokenizer's image decoder trains N adversarial steps after its own
(``adversarial_decoder``) and the prior is left out.

The data are the same fixed random patches and token cache every time. Label dropout is off: it
draws from per-rank seeds, so with it the distributed run is not the single-process run number for
number. Codes unused for 3 steps are restarted, so the rank-synchronised restarts are exercised.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pathar_aug import distributed  # noqa: E402
from pathar_aug.config import override  # noqa: E402
from pathar_aug.patches import PatchSet  # noqa: E402
from pathar_aug.prior import PRIOR_PRESETS  # noqa: E402
from pathar_aug.tokenizer import TOKENIZER_PRESETS  # noqa: E402
from pathar_aug.train_prior import train_prior  # noqa: E402
from pathar_aug.train_tokenizer import train_tokenizer  # noqa: E402
from pathar_aug.training import save_checkpoint  # noqa: E402

LABELS = ["a", "b", "c"]


def patches(n: int = 24, size: int = 32) -> PatchSet:
    g = torch.Generator().manual_seed(0)
    blobs = torch.nn.functional.avg_pool2d(torch.rand(n, 1, size, size, generator=g), 5, 1, 2)
    masks = (blobs > 0.5).to(torch.uint8)
    tint = torch.randint(0, 255, (n, 3, 1, 1), generator=g)
    images = (tint * masks + torch.randint(0, 60, (n, 3, size, size), generator=g)).clamp(0, 255).to(torch.uint8)
    labels = torch.arange(n) % len(LABELS)
    return PatchSet(images, masks, labels, LABELS, [f"src{i}" for i in range(n)])


def token_cache(path: Path, n: int = 48, grid: int = 4, codes: int = 32) -> Path:
    g = torch.Generator().manual_seed(1)
    structure = torch.randint(0, codes // 4, (n, grid, grid), generator=g)  # a learnable, skewed stream
    appearance = (structure * 3 + torch.randint(0, 2, (n, grid, grid), generator=g)) % codes
    save_checkpoint(path, structure=structure, appearance=appearance, labels=torch.arange(n) % len(LABELS),
                    label_names=LABELS, num_structure_codes=codes, num_appearance_codes=codes)
    return path


def main() -> None:
    out, steps, resume = Path(sys.argv[1]), int(sys.argv[2]), "--resume" in sys.argv
    adversarial = int(sys.argv[sys.argv.index("--adversarial") + 1]) if "--adversarial" in sys.argv else 0
    torch.set_num_threads(1)
    device = distributed.init(torch.device("cpu"))
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = override(TOKENIZER_PRESETS["tiny"], steps=steps, log_every=1, ckpt_every=1000,
                         preview_every=1000, dead_code_steps=2, structure_codes=512, appearance_codes=512,
                         adversarial_steps=adversarial)
    train_tokenizer(patches(), out / "tokenizer", tokenizer, device, resume=resume, show_progress=False, seed=3)
    if adversarial:
        distributed.shutdown()
        return
    if distributed.is_main() and not (out / "tokens.pt").exists():
        token_cache(out / "tokens.pt")
    distributed.barrier()
    prior = override(PRIOR_PRESETS["tiny"], steps=steps, log_every=1, ckpt_every=1000, label_dropout=0.0)
    train_prior(out / "tokens.pt", out / "prior", prior, device, resume=resume, progress=False)
    distributed.shutdown()


if __name__ == "__main__":
    main()
