"""Adversarial fine-tuning of the tokenizer's image decoder (a deviation from the paper, see README).

The paper trains the image decoder with L1 alone (Eq. 9). An L1 decoder paints the mean of all the
images a token grid can stand for: smooth tiles with flat backgrounds. On DSB2018 the synthetic
histology tiles had half the real tiles' fine detail and twice their nucleus contrast, and nnU-Net
trained with them lost recall on real histology (README, "Why histology loses").

This stage trains the image decoder on for ``TokenizerConfig.adversarial_steps`` after the
tokenizer's own steps, with L1 plus a hinge GAN loss from a PatchGAN discriminator trained alongside
from scratch (Isola et al. 2017), weighted adaptively against L1 at the decoder's last layer (the
VQGAN recipe, Esser et al. 2021). With ``TokenizerConfig.conditional_discriminator`` the
discriminator sees the tile's mask and label beside the image (a conditional PatchGAN, as pix2pix
conditions on its input): real and decoded tile share both, so it can only tell them apart by how
the image draws these nuclei in this modality. ``TokenizerConfig.adversarial_labels`` limits the GAN
term and the discriminator to some labels' tiles; the others train on L1 alone. Conditioning is off by default: on DSB2018 it did not cure what it
was meant to (brightfield's ringing and tint, README "Texture"). Only the fusion and the image decoder learn: encoders, codebooks
and the mask decoder are frozen, so every token is what it was and the token cache and the prior
stay valid; a trained run can gain the stage afterwards (``train --resume --adversarial-steps``).
No pretrained network is involved, so nothing is downloaded.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pathar_aug import distributed
from pathar_aug.tokenizer import (
    DualVQTokenizer,
    TokenizerConfig,
    images_to_float,
    same_label_partners,
    shuffle_positions,
)

LOSS_TERMS = ("rec", "generator", "discriminator", "adaptive_weight", "real_score", "fake_score")
BETAS = (0.5, 0.9)  # the usual GAN betas (VQGAN, pix2pix): a short memory for a moving opponent


class PatchDiscriminator(nn.Module):
    """PatchGAN: a real/fake score per overlapping patch (about 70 px wide with three strided
    layers), so it judges texture and edges rather than the layout of a whole tile."""

    def __init__(self, width: int = 32, layers: int = 3, in_channels: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = width
        for i in range(1, layers + 1):
            c_next = width * 2 ** min(i, 3)
            mods += [nn.Conv2d(c, c_next, 4, stride=2 if i < layers else 1, padding=1),
                     nn.GroupNorm(min(32, c_next // 4), c_next), nn.LeakyReLU(0.2)]
            c = c_next
        mods.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def discriminator_input(x: torch.Tensor, structure: torch.Tensor | None, labels: torch.Tensor | None,
                        num_labels: int) -> torch.Tensor:
    """What the discriminator reads: the image alone, or (``structure`` given) the image, the mask
    as the structure encoder reads it and the label one-hot, each as channels of every pixel."""
    if structure is None:
        return x
    onehot = torch.zeros(len(x), num_labels, *x.shape[-2:], device=x.device, dtype=x.dtype)
    if labels is not None:
        onehot[torch.arange(len(x), device=x.device), labels.to(x.device)] = 1.0
    return torch.cat([x, structure.to(x.dtype), onehot], dim=1)


class ImageHead(nn.Module):
    """The part of the tokenizer this stage trains: fusion and image decoder, (Q_s, Q_a) -> image."""

    def __init__(self, tokenizer: DualVQTokenizer):
        super().__init__()
        self.fusion, self.image_decoder = tokenizer.fusion, tokenizer.image_decoder

    def forward(self, q_s: torch.Tensor, q_a: torch.Tensor) -> torch.Tensor:
        return self.image_decoder(self.fusion(q_s, q_a))

    @property
    def last_layer(self) -> torch.Tensor:
        return self.image_decoder.net[-1].weight


def tile_mean(scores: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over patches and tiles, each tile counted with its weight (None: all alike). A batch
    without a weighted tile gives 0, with the graph intact: every rank runs the same backward."""
    if weights is None:
        return scores.mean()
    per_tile = scores.flatten(1).mean(dim=1)
    return (per_tile * weights).sum() / weights.sum().clamp(min=1.0)


def discriminator_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
    """Hinge loss of the discriminator (``weights``: per tile, see ``tile_mean``)."""
    return tile_mean(F.relu(1.0 - real_scores), weights) + tile_mean(F.relu(1.0 + fake_scores), weights)


def judged_label_ids(cfg: TokenizerConfig, label_names: Sequence[str]) -> list[int] | None:
    """The label ids of ``cfg.adversarial_labels`` (None: every label). Raises on an unknown name."""
    if not cfg.adversarial_labels:
        return None
    unknown = [n for n in cfg.adversarial_labels if n not in label_names]
    if unknown:
        raise ValueError(f"adversarial_labels names {unknown}, not labels of this run's data "
                         f"(its labels: {list(label_names)})")
    return [list(label_names).index(n) for n in cfg.adversarial_labels]


def adaptive_weight(rec: torch.Tensor, generator: torch.Tensor, last_layer: torch.Tensor,
                    limit: float = 1e4) -> torch.Tensor:
    """||grad rec|| / ||grad generator|| at the decoder's last layer (VQGAN): the GAN term pulls
    as hard as L1 there, whatever the scale of either loss. Under DDP the gradients are averaged
    over the ranks first: every rank weighs with the global batch's value, as one process would."""
    g_rec = distributed.all_mean(torch.autograd.grad(rec, last_layer, retain_graph=True)[0])
    g_gen = distributed.all_mean(torch.autograd.grad(generator, last_layer, retain_graph=True)[0])
    return (g_rec.norm() / (g_gen.norm() + 1e-4)).clamp(0.0, limit).float().detach()


class AdversarialDecoderTrainer:
    """One object per stage: the frozen tokenizer's codes in, decoder and discriminator steps out.
    ``state_dict`` / ``load_state_dict`` carry the discriminator and both optimisers for --resume."""

    def __init__(self, tokenizer: DualVQTokenizer, cfg: TokenizerConfig, device: torch.device,
                 label_names: Sequence[str]):
        self.tokenizer, self.cfg, self.num_labels = tokenizer, cfg, len(label_names)
        self.judged_labels = judged_label_ids(cfg, label_names)
        num_labels = self.num_labels
        for p in tokenizer.parameters():
            p.requires_grad_(False)
        self.head = ImageHead(tokenizer)
        for p in self.head.parameters():
            p.requires_grad_(True)
        in_channels = 3 + (cfg.mask_channels + num_labels if cfg.conditional_discriminator else 0)
        self.discriminator = PatchDiscriminator(cfg.discriminator_width, in_channels=in_channels).to(device)
        self.head_opt = torch.optim.Adam(self.head.parameters(), lr=cfg.adversarial_lr, betas=BETAS)
        self.disc_opt = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.adversarial_lr, betas=BETAS)
        self.head_ddp = distributed.wrap(self.head, device)
        self.disc_ddp = distributed.wrap(self.discriminator, device)

    def state_dict(self) -> dict:
        return {"discriminator": self.discriminator.state_dict(), "decoder_optimizer": self.head_opt.state_dict(),
                "discriminator_optimizer": self.disc_opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        stored = state["discriminator"]["net.0.weight"].shape[1]
        if stored != self.discriminator.net[0].weight.shape[1]:
            raise ValueError(f"the checkpoint's discriminator reads {stored} input channels, this run's "
                             f"{self.discriminator.net[0].weight.shape[1]}: it was trained with another "
                             "conditional_discriminator setting or label count; its adversarial stage cannot go on")
        self.discriminator.load_state_dict(state["discriminator"])
        self.head_opt.load_state_dict(state["decoder_optimizer"])
        self.disc_opt.load_state_dict(state["discriminator_optimizer"])

    @torch.no_grad()
    def _codes(self, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen codes (Q_s, Q_a) of a batch, with the tokenizer's own appearance partner and
        shuffle draws, so that the decoder stays structure-led as it was trained."""
        tok = self.tokenizer.eval()
        s, a = tok.encode(images, masks)
        q_s, q_a = tok.structure_vq.lookup(s), tok.appearance_vq.lookup(a)
        if self.cfg.appearance_partner > 0 and labels is not None:
            q_a = q_a[same_label_partners(labels, self.cfg.appearance_partner).to(q_a.device)]
        if self.cfg.appearance_shuffle > 0:
            q_a = shuffle_positions(q_a, self.cfg.appearance_shuffle)
        return q_s, q_a

    def _tile_weights(self, labels: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor | None:
        """1 for the tiles the GAN term judges, 0 for the rest (None: all are judged)."""
        if self.judged_labels is None:
            return None
        if labels is None:
            raise ValueError("adversarial_labels needs the batch's labels")
        return torch.isin(labels.to(device), torch.tensor(self.judged_labels, device=device)).float()

    def step(self, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor | None,
             autocast: Callable[[], object]) -> dict[str, torch.Tensor]:
        """One decoder step (L1 + adaptive x weight x hinge generator loss), then one discriminator
        step on the same batch. Returns the terms of ``LOSS_TERMS`` (detached)."""
        x = images_to_float(images)
        q_s, q_a = self._codes(images, masks, labels)
        structure = self.tokenizer._structure_input(masks) if self.cfg.conditional_discriminator else None
        weights = self._tile_weights(labels, len(x), x.device)

        def judged(images: torch.Tensor) -> torch.Tensor:
            return discriminator_input(images, structure, labels, self.num_labels)

        self.head.train()
        self.discriminator.train()
        with autocast():
            x_hat = self.head_ddp(q_s, q_a).float()
            rec = F.l1_loss(x_hat, x)
            # scored by the plain module: the generator step must not sync the discriminator's
            # gradients (they are zeroed before its own step)
            generator = -tile_mean(self.discriminator(judged(x_hat)).float(), weights)
        weight = adaptive_weight(rec, generator, self.head.last_layer)
        loss = rec + self.cfg.adversarial_weight * weight * generator
        self.head_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.head.parameters(), 1.0)
        self.head_opt.step()

        with autocast():
            # one forward for both halves (GroupNorm is per sample): one gradient sync per step
            real_scores, fake_scores = self.disc_ddp(torch.cat([judged(x), judged(x_hat.detach())])).float().chunk(2)
            d_loss = discriminator_loss(real_scores, fake_scores, weights)
        self.disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        self.disc_opt.step()
        self.tokenizer.eval()
        return {"rec": rec.detach(), "generator": generator.detach(), "discriminator": d_loss.detach(),
                "adaptive_weight": weight, "real_score": tile_mean(real_scores.detach(), weights),
                "fake_score": tile_mean(fake_scores.detach(), weights)}
