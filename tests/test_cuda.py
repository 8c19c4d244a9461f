"""The CUDA paths: bf16 autocast in training and sampling, TF32, --compile, pinned-memory batches.

Marked ``cuda`` and skipped without a GPU (``pytest -m cuda`` selects them; benchmarks/gpu_check.sh
runs them). Tiny presets: seconds on any GPU, plus the compilation of the --compile tests.
"""
from __future__ import annotations

import pytest
import torch

from pathar_aug.config import SamplingConfig, override
from pathar_aug.prior import PRIOR_PRESETS, InterleavedPrior
from pathar_aug.tokenizer import TOKENIZER_PRESETS, DualVQTokenizer

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _patches(n: int = 16, size: int = 32):
    from tests.ddp_worker import patches

    return patches(n, size)


def _tokens(path):
    from tests.ddp_worker import token_cache

    return token_cache(path)


def test_auto_device_is_cuda_with_tf32():
    from pathar_aug.device import resolve_device

    device = resolve_device("auto")
    assert device.type == "cuda"
    matmul = torch.backends.cuda.matmul
    assert (matmul.fp32_precision == "tf32") if hasattr(matmul, "fp32_precision") else matmul.allow_tf32


def test_pinned_batches_arrive_intact():
    from pathar_aug.device import to_device

    batch = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8)
    moved = to_device(batch, torch.device("cuda"))
    assert moved.device.type == "cuda" and torch.equal(moved.cpu(), batch)


def test_tokenizer_forward_runs_in_bf16_and_trains(tmp_path):
    from pathar_aug.device import autocast
    from pathar_aug.train_tokenizer import load_tokenizer, train_tokenizer

    device = torch.device("cuda")
    patches = _patches()
    model = DualVQTokenizer(TOKENIZER_PRESETS["tiny"]).to(device)
    with autocast(device):
        out = model(patches.images[:4].to(device), patches.masks[:4].to(device))
    assert out["image"].dtype == torch.bfloat16 and torch.isfinite(out["loss"])
    cfg = override(TOKENIZER_PRESETS["tiny"], steps=6, log_every=2)
    path = train_tokenizer(patches, tmp_path, cfg, device, show_progress=False)
    with (tmp_path / "tokenizer_loss.csv").open() as f:
        losses = [float(line.split(",")[1]) for line in f.readlines()[1:]]
    assert len(losses) == 3 and all(map(lambda v: v == v and v < 100, losses))
    assert load_tokenizer(path, "cpu").cfg == cfg  # a CUDA checkpoint loads on the CPU


@pytest.mark.parametrize("compile", [False, True])
def test_prior_trains_in_bf16_and_compiled_checkpoints_keep_their_keys(tmp_path, compile):
    from pathar_aug.train_prior import load_prior, train_prior

    cfg = override(PRIOR_PRESETS["tiny"], steps=8, log_every=4)
    path = train_prior(_tokens(tmp_path / "tokens.pt"), tmp_path / "prior", cfg, "cuda", progress=False,
                       compile=compile)
    prior = load_prior(path, "cpu")  # a plain module: the compiled blocks saved the same keys
    assert prior.num_parameters() > 0
    last = (tmp_path / "prior" / "prior_loss.csv").read_text().splitlines()[-1].split(",")
    assert float(last[1]) < 10 and float(last[2]) < 10


def _random_prior(device, grid: tuple[int, int] = (4, 4)) -> InterleavedPrior:
    torch.manual_seed(0)
    return InterleavedPrior(PRIOR_PRESETS["tiny"], 32, 32, grid, num_labels=3).to(device).eval()


@pytest.mark.parametrize("compile", [False, True])
def test_cached_sampling_on_cuda_is_reproducible_and_in_range(compile):
    from pathar_aug.sampler import sample_tokens

    prior = _random_prior("cuda")
    cfg = SamplingConfig(batch_size=8, seed=5, compile=compile)
    labels = [0, 1, 2] * 4
    s1, a1 = sample_tokens(prior, labels, cfg, "cuda")
    s2, a2 = sample_tokens(prior, labels, cfg, "cuda")
    assert s1.shape == a1.shape == (12, 4, 4)
    assert torch.equal(s1, s2) and torch.equal(a1, a2)  # the same seed, the same pairs
    assert 0 <= int(s1.min()) and int(s1.max()) < 32 and 0 <= int(a1.min()) and int(a1.max()) < 32


def test_bf16_prior_loss_follows_the_float32_one():
    """Teacher-forced NLL under bf16 autocast on the GPU is the CPU's float32 NLL up to bf16 rounding."""
    from pathar_aug.device import autocast

    g = torch.Generator().manual_seed(0)
    s, a = torch.randint(0, 32, (8, 4, 4), generator=g), torch.randint(0, 32, (8, 4, 4), generator=g)
    y = torch.arange(8) % 3
    with torch.no_grad():
        cpu = torch.stack(_random_prior("cpu").loss(s, a, y))
        with autocast(torch.device("cuda")):
            gpu = torch.stack(_random_prior("cuda").loss(s.cuda(), a.cuda(), y.cuda())).float().cpu()
    torch.testing.assert_close(gpu, cpu, rtol=2e-2, atol=0)


def test_generator_decodes_uint8_pairs_on_cuda(tmp_path):
    from pathar_aug.generator import Generator

    device = torch.device("cuda")
    tokenizer = DualVQTokenizer(override(TOKENIZER_PRESETS["tiny"], structure_codes=32, appearance_codes=32))
    generator = Generator(tokenizer.to(device).eval(), _random_prior(device, (8, 8)), ["a", "b", "c"], tmp_path)
    images, masks = generator.generate([0, 1, 2], SamplingConfig(batch_size=4), device)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 32, 32)
    assert masks.shape == (3, 1, 32, 32) and set(masks.unique().tolist()) <= {0, 1}
