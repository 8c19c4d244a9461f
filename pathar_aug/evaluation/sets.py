"""The generated sets `pathar-aug evaluate` judges, cached on disk: tokenizer reconstructions, pairs
sampled from the run and the weak baseline."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from nnunet_integration.atomic import atomic_write_bytes
from nnunet_integration.names import case_part

from ..filter_order import DEFAULT_ORDER
from ..reporter import Reporter
from ..sampler import SamplingConfig
from .images import Pair

RECON = "tokenizer reconstructions"
SWAP = "tokenizer swap"  # (S_p, A_q) of two real tiles, q of any label: does the image follow S?
MODEL = "model"
MODEL_FILTERED = "model, filtered"  # n of 2 x n draws that pass the run's quality filter (filter_order)
WEAK = "weak: marginal tokens"
# Fewer than synthesize's DEFAULT_OVERSAMPLE (3): the evaluation's filtered row shows what the filter
# selects from a fixed draw, and every committed generation-quality table was made at 2.
FILTER_OVERSAMPLE = 2

# --------------------------------------------------------------------------------- set caching
def file_id(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def cached_pairs(cache: Path | None, key_data: dict,
                  make: Callable[[Path | None], tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[Pair], bool]:
    """(pairs, from_cache): uint8 B x 3 x P x P images and B x 1 x P x P masks, stored as .npz.
    ``make`` gets a scratch folder for partial results (removed once the set is stored)."""
    path = scratch = None
    if cache is not None:
        key = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()[:20]
        path = cache / "sets" / f"{case_part(str(key_data.get('set', 'set')))[:40]}-{key}.npz"
        scratch = path.with_name(path.stem + ".partial")
        if path.is_file():
            with np.load(path) as z:
                return list(zip(z["images"], z["masks"])), True
    images, masks = make(scratch)
    imgs = images.permute(0, 2, 3, 1).contiguous().numpy().astype(np.uint8)
    msks = masks[:, 0].numpy().astype(np.uint8)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, lambda f: np.savez_compressed(f, images=imgs, masks=msks))
        shutil.rmtree(scratch, ignore_errors=True)
    return list(zip(imgs, msks)), False


def _to_tensors(pairs: Sequence[Pair], tokenizer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and masks as the tokenizer reads them: binary masks, or a multi-class tokenizer's class ids."""
    images = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).contiguous()
    if tokenizer is not None and tokenizer.cfg.num_classes > 2:
        masks = torch.from_numpy(np.stack([np.asarray(p[1]).astype(np.uint8) for p in pairs]))[:, None]
    else:
        masks = torch.from_numpy(np.stack([(np.asarray(p[1]) > 0).astype(np.uint8) for p in pairs]))[:, None]
    return images, masks


@torch.no_grad()
def reconstruct(tokenizer, pairs: Sequence[Pair], device: torch.device, batch_size: int = 64
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode and decode real pairs with the run's tokenizer."""
    images, masks = _to_tensors(pairs, tokenizer)
    out_i, out_m = [], []
    for start in range(0, len(images), batch_size):
        s, a = tokenizer.encode(images[start:start + batch_size].to(device), masks[start:start + batch_size].to(device))
        img, msk = tokenizer.decode(s, a)
        out_i.append(img.cpu())
        out_m.append(msk.cpu())
    return torch.cat(out_i), torch.cat(out_m)


@torch.no_grad()
def swap_pairs(tokenizer, structure: Sequence[Pair], appearance: Sequence[Pair], device: torch.device,
               batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper Fig. 6: the image decoded from the structure tokens of ``structure[i]`` and the
    appearance tokens of ``appearance[i]``, with the mask decoded from that structure alone."""
    s_images, s_masks = _to_tensors(structure, tokenizer)
    a_images, a_masks = _to_tensors(appearance, tokenizer)
    out_i, out_m = [], []
    for start in range(0, len(s_images), batch_size):
        sl = slice(start, start + batch_size)
        s = tokenizer.encode_structure(s_masks[sl].to(device))
        a = tokenizer.encode_appearance(a_images[sl].to(device))
        img, msk = tokenizer.decode(s, a)
        out_i.append(img.cpu())
        out_m.append(msk.cpu())
    return torch.cat(out_i), torch.cat(out_m)


def swap_partners(reference: dict[str, list[Pair]], n: int, seed: int) -> dict[str, list[tuple[Pair, Pair]]]:
    """Per label, up to n (structure, appearance) pairs: structure from that label's tiles, appearance
    from a tile of any label (so most swaps cross modalities), never the same tile."""
    rng = np.random.default_rng(seed)
    pool = [(lb, i) for lb in sorted(reference) for i in range(len(reference[lb]))]
    out = {}
    for label in sorted(reference):
        tiles = reference[label]
        picks = rng.permutation(len(tiles))[:n]
        partners = []
        for i in picks:
            j = int(rng.integers(len(pool)))
            if pool[j] == (label, int(i)):
                j = (j + 1) % len(pool)
            other = pool[j]
            partners.append((tiles[int(i)], reference[other[0]][other[1]]))
        out[label] = partners
    return out


def sample_model(generator, labels: Sequence[int], sampling: SamplingConfig, device: torch.device,
                 on_chunk: Callable[[int], None] | None = None, chunk_dir: Path | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One pair per entry of ``labels`` (label indices), in chunks of sampling.batch_size that may
    mix labels; chunk c is seeded by (seed, c), so the same settings give the same pairs. With
    ``chunk_dir`` every finished chunk is kept there, so an interrupted run resumes."""
    labels = list(labels)
    images, masks = [], []
    for c, start in enumerate(range(0, len(labels), sampling.batch_size)):
        chunk = labels[start:start + sampling.batch_size]
        path = chunk_dir / f"chunk{c:05d}.pt" if chunk_dir is not None else None
        if path is not None and path.is_file():
            img, msk = torch.load(path, weights_only=True)
        else:
            cfg = dataclasses.replace(sampling, seed=sampling.seed * 1_000_003 + c)
            img, msk = generator.generate(chunk, cfg, device)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, lambda f: torch.save((img, msk), f))
        images.append(img)
        masks.append(msk)
        if on_chunk is not None:
            on_chunk(len(chunk))
    return torch.cat(images), torch.cat(masks)


def generated_sets(generator, model: Path, floor: dict[str, list[Pair]], labels: Sequence[str], n: int,
                   sampling: SamplingConfig, device: torch.device, cache: Path | None, *, recon: bool, sample: bool,
                   weak_baseline: bool, reporter: Reporter, reference: dict[str, list[Pair]] | None = None,
                   min_agreement: float | None = None, filter_order: str = DEFAULT_ORDER) -> dict[str, dict[str, list[Pair]]]:
    """Label -> pairs of each generated set, from the cache when made before: the tokenizer's
    reconstructions of the ``floor`` pairs (``recon``) and its swaps of ``reference`` pairs (with
    ``recon`` and a reference), ``n`` pairs per label sampled from the run (``sample``; with the
    run's quality filter, 2 n are drawn: the first n are the model's set, the n the filter ranks
    best of all 2 n, or the first n in ``filter_order="draw"``, among those reaching its threshold
    or ``min_agreement``, the filtered set) and
    the weak baseline of marginal tokens (``weak_baseline``)."""
    ckpt_id = [file_id(Path(model) / "tokenizer" / "tokenizer.pt"), file_id(Path(model) / "prior" / "prior.pt")]
    weak = None
    if weak_baseline:
        try:
            from .weak_generator import MarginalTokenGenerator

            weak = MarginalTokenGenerator.from_run(model, generator.label_names)
        except FileNotFoundError as exc:
            reporter.log(f"no weak baseline: {exc}")
    quality = None
    if sample:
        from ..quality_filter import QualityFilter, filter_complete

        quality = QualityFilter.load(model, device) if filter_complete(model) else None
    swaps = swap_partners(reference, n, seed=sampling.seed) if recon and reference else {}
    jobs = [job for job, wanted in ((RECON, recon), (SWAP, bool(swaps)), (MODEL, sample), (WEAK, weak is not None))
            if wanted]
    labels = sorted(labels)
    draws = n * (FILTER_OVERSAMPLE if quality is not None else 1)
    total = sum({RECON: len(floor.get(lb, [])), SWAP: len(swaps.get(lb, [])), MODEL: draws}.get(j, n)
                for j in jobs for lb in labels)
    sets: dict[str, dict[str, list[Pair]]] = {}
    cached = []
    reporter.log(f"generating {', '.join(jobs)}: {total} pairs (cached sets are reused)")
    with reporter.task("generate", total=total) as task:
        for job in jobs:
            task.update(info=job)
            key = {"set": job, "labels": labels, "ckpt": ckpt_id, "patch": generator.patch_size}
            if job == RECON:
                present = [lb for lb in labels if lb in floor]
                owners = [lb for lb in present for _ in floor[lb]]
                inputs = [p for lb in present for p in floor[lb]]
                key["inputs"] = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes()
                                                        for p in inputs for a in p)).hexdigest()
                make = lambda _, inputs=inputs: reconstruct(generator.tokenizer, inputs, device)  # noqa: E731
            elif job == SWAP:
                owners = [lb for lb in labels for _ in swaps.get(lb, [])]
                both = [pair for lb in labels for pair in swaps.get(lb, [])]
                key["inputs"] = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes()
                                                        for two in both for p in two for a in p)).hexdigest()
                make = lambda _, both=both: swap_pairs(  # noqa: E731
                    generator.tokenizer, [b[0] for b in both], [b[1] for b in both], device)
            elif job == MODEL:
                owners = [lb for lb in labels for _ in range(draws)]
                key.update(n=draws, sampling=dataclasses.asdict(sampling))
                make = lambda scratch, owners=owners: sample_model(  # noqa: E731
                    generator, [generator.label_index(lb) for lb in owners], sampling, device,
                    on_chunk=task.advance, chunk_dir=scratch)
            else:
                owners = [lb for lb in labels if weak.has_label(generator.label_index(lb)) for _ in range(n)]
                key.update(n=n, seed=sampling.seed, tokens=file_id(Path(model) / "tokens" / "train_tokens.pt"))
                make = lambda _, owners=owners: weak.generate(  # noqa: E731
                    generator.tokenizer, [generator.label_index(lb) for lb in owners], device, seed=sampling.seed)
            pairs, hit = cached_pairs(cache, key, make)
            if hit:
                cached.append(job)
            if hit or job != MODEL:
                task.advance(len(pairs))
            sets[job] = {}
            for lb, pair in zip(owners, pairs):
                sets[job].setdefault(lb, []).append(pair)
            if job == MODEL and quality is not None:
                drawn = sets[MODEL]
                sets[MODEL] = {lb: pairs[:n] for lb, pairs in drawn.items()}
                sets[MODEL_FILTERED] = {}
                for lb, pairs in drawn.items():
                    kept = quality.select([p[0] for p in pairs], [p[1] for p in pairs], lb, keep=n,
                                          min_agreement=min_agreement, order=filter_order).kept
                    sets[MODEL_FILTERED][lb] = [pairs[i] for i in kept]
    if cached:
        reporter.log(f"from cache: generated sets {', '.join(cached)}")
    return sets
