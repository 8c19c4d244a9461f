"""Dual-VQ tokenizer (paper Sec. III-B): mask -> structure tokens S, image -> appearance tokens A.

    E_s(mask) -> Z_s -> VQ_s -> Q_s --> D_seg(Q_s)            -> mask logits   (structure only)
    E_a(image) -> Z_a -> VQ_a -> Q_a -\
                                Q_s --+-> fuse -> D([Q_s;Q_a]) -> image
    loss = L_rec + L_VQ^s + L_VQ^a + L_seg     (Eq. 9, unweighted; L_seg = BCE + Dice)

Images enter as uint8 RGB and are scaled to [-1, 1]; masks enter as {0, 1}.

Multi-class masks (an extension beyond the paper, whose masks are binary): with ``num_classes``
K > 2 the masks hold class indices 0 .. K-1, the structure encoder reads them one-hot (K channels),
the mask decoder D_seg has K logits per pixel and L_seg is cross-entropy + soft Dice over the
foreground classes. K = 2 is the paper's binary tokenizer, unchanged (one mask channel in, one
logit out, BCE + Dice), and the default, so that checkpoints without the field load as before.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pathar_aug.quantizer import VectorQuantizer


@dataclass(frozen=True)
class TokenizerConfig:
    patch_size: int = 128
    downsample: int = 8  # r: token grid is patch_size / r on each side
    channels: tuple[int, ...] = (32, 64, 128, 128)  # encoder width per resolution, len = log2(r) + 1
    res_blocks: tuple[int, ...] = (0, 1, 1, 1)  # residual blocks per resolution (full res is the costly one)
    code_dim: int = 16  # d
    structure_codes: int = 256  # K_s
    appearance_codes: int = 256  # K_a
    vq_beta: float = 0.25
    dead_code_steps: int = 200  # a code unused this many steps is restarted from encoder outputs
    # Structure-led decoding (a deviation from the paper, see README): in training, this share of
    # samples has its appearance codes spatially shuffled before the image decoder, which must then
    # take the layout of nuclei from S and only colour and texture from A. Without it the decoder
    # reads the layout off A (the token-swap grid shows it), and a sampled A that disagrees with its
    # S yields an image that disagrees with its mask.
    appearance_shuffle: float = 0.0
    # The same idea across tiles: this share of samples is decoded with the appearance codes of
    # another sample of its label in the batch (needs the labels; the target stays its own image).
    # Shuffling alone never shows the decoder the appearance codes of nuclei over an empty S, and
    # a swapped or sampled A from a tile with nuclei then paints nuclei there (README, "Nuclei
    # follow S").
    appearance_partner: float = 0.0
    num_classes: int = 2  # mask classes incl. background; 2 = binary (the paper), K > 2 see module doc
    # Texture (a deviation from the paper, see README and adversarial_decoder.py): after ``steps``,
    # this many steps train the image decoder alone on L1 + a PatchGAN loss (weighted adaptively,
    # times ``adversarial_weight``); the tokens stay what they were. 0: the paper's L1 decoder.
    adversarial_steps: int = 0
    # its own batch: a GPU run's tokenizer batch of 64 makes each adversarial step ~10 s on a CPU core
    adversarial_batch_size: int = 16
    adversarial_weight: float = 0.5
    adversarial_lr: float = 1e-4
    discriminator_width: int = 32
    # the discriminator also reads the tile's mask and label (conditional PatchGAN). Off: on DSB2018
    # it neither stopped brightfield's ringing nor kept its grey, and histology gained less detail
    # (README, "Texture"; decoder_texture_gpu_partner_cadv)
    conditional_discriminator: bool = False
    # the labels whose tiles the GAN term and the discriminator see (empty: every label); the others
    # keep L1 alone, so a modality the L1 decoder already draws well is not pulled away from it
    # (DSB2018: 2,000 steps on every label cost fluorescence a third of its nucleus contrast while
    # histology gained its fine detail; README, "Texture")
    adversarial_labels: tuple[str, ...] = ()
    # optimisation (paper: AdamW beta (0.9, 0.95), weight decay 0.05, lr 1e-4)
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    batch_size: int = 16
    steps: int = 2000
    log_every: int = 25
    ckpt_every: int = 250
    preview_every: int = 500

    def __post_init__(self) -> None:
        levels = math.log2(self.downsample)
        if not levels.is_integer() or levels < 1:
            raise ValueError(f"downsample must be a power of two >= 2, got {self.downsample}")
        if len(self.channels) != int(levels) + 1:
            raise ValueError(f"channels needs log2(downsample) + 1 = {int(levels) + 1} entries, got {self.channels}")
        if len(self.res_blocks) != len(self.channels):
            raise ValueError(f"res_blocks needs one entry per resolution ({len(self.channels)}), got {self.res_blocks}")
        for name in ("appearance_shuffle", "appearance_partner"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability, got {getattr(self, name)}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or not 2 <= self.num_classes <= 255:
            raise ValueError(f"num_classes is a whole number from 2 to 255, got {self.num_classes!r}")
        if isinstance(self.adversarial_steps, bool) or not isinstance(self.adversarial_steps, int) \
                or self.adversarial_steps < 0:
            raise ValueError(f"adversarial_steps is a whole number >= 0, got {self.adversarial_steps!r}")
        if isinstance(self.adversarial_labels, str) or not all(isinstance(n, str) for n in self.adversarial_labels):
            raise ValueError(f"adversarial_labels is a list of label names, got {self.adversarial_labels!r}")
        if self.patch_size % self.downsample:
            raise ValueError(f"patch_size {self.patch_size} is not a multiple of downsample {self.downsample}")

    @property
    def mask_channels(self) -> int:
        """Channels of the structure encoder's input and the mask decoder's output: 1 for binary
        masks, one per class otherwise."""
        return 1 if self.num_classes == 2 else self.num_classes

    @property
    def total_steps(self) -> int:
        """The step count of a finished tokenizer checkpoint: its own steps, then the decoder's
        adversarial ones."""
        return self.steps + self.adversarial_steps

    @property
    def grid(self) -> tuple[int, int]:
        n = self.patch_size // self.downsample
        return n, n


TOKENIZER_PRESETS: dict[str, TokenizerConfig] = {
    # seconds on a CPU: only for tests
    "tiny": TokenizerConfig(patch_size=32, downsample=4, channels=(8, 16, 16), res_blocks=(0, 1, 1), code_dim=8,
                            structure_codes=32, appearance_codes=32, lr=1e-3, batch_size=8, steps=30,
                            log_every=5, ckpt_every=15, preview_every=15, dead_code_steps=10),
    # this 2-core machine. Deviation from the paper, stated in the README: 128 px patches at r = 8
    # (a 16 x 16 grid, the paper's sequence length) instead of 256 px at r = 16, smaller K and
    # widths, and a higher lr so that ~20 minutes of CPU training converge.
    "cpu": TokenizerConfig(patch_size=128, downsample=8, channels=(16, 32, 64, 128), res_blocks=(0, 1, 1, 2), code_dim=16,
                           structure_codes=256, appearance_codes=512, appearance_shuffle=0.5, lr=1e-3,
                           batch_size=16, steps=1200, log_every=25, ckpt_every=100, preview_every=300),
    # the paper's setting: 256 px, r = 16, K_s = K_a = 1024, d = 16, AdamW (0.9, 0.95), wd 0.05,
    # lr 1e-4; VQGAN-sized widths so that with the paper prior the total is near 170.73 M.
    "paper": TokenizerConfig(patch_size=256, downsample=16, channels=(128, 256, 256, 512, 512), res_blocks=(2, 2, 2, 2, 3),
                             code_dim=16, structure_codes=1024, appearance_codes=1024, lr=1e-4,
                             batch_size=32, steps=100_000, ckpt_every=2000, preview_every=2000),
}


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, c // 4) if c >= 8 else 1, c)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.block = nn.Sequential(_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
                                   _norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


class Encoder(nn.Module):
    """in_ch x H x W -> d x H/r x W/r: conv, then per resolution res blocks and a strided conv."""

    def __init__(self, in_ch: int, cfg: TokenizerConfig):
        super().__init__()
        ch = cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(in_ch, ch[0], 3, padding=1)]
        for i in range(len(ch) - 1):
            layers += [ResBlock(ch[i], ch[i]) for _ in range(cfg.res_blocks[i])]
            layers.append(nn.Conv2d(ch[i], ch[i + 1], 4, stride=2, padding=1))
        layers += [ResBlock(ch[-1], ch[-1]) for _ in range(cfg.res_blocks[-1])]
        layers += [_norm(ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], cfg.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """width x h x w -> out_ch x H x W: mirror of the encoder with nearest upsampling."""

    def __init__(self, out_ch: int, cfg: TokenizerConfig):
        super().__init__()
        ch, blocks = cfg.channels[::-1], cfg.res_blocks[::-1]
        layers: list[nn.Module] = [ResBlock(ch[0], ch[0]) for _ in range(blocks[0])]
        for i in range(len(ch) - 1):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch[i], ch[i + 1], 3, padding=1)]
            layers += [ResBlock(ch[i + 1], ch[i + 1]) for _ in range(blocks[i + 1])]
        layers += [_norm(ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], out_ch, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Fusion(nn.Module):
    """[Q_s; Q_a] (Eq. 8): project both to the decoder width, scale appearance by structure,
    concatenate, 1 x 1 conv. Structure is the morphology-grounded condition, appearance the residual."""

    def __init__(self, code_dim: int, width: int):
        super().__init__()
        self.proj_s = nn.Conv2d(code_dim, width, 1)
        self.proj_a = nn.Conv2d(code_dim, width, 1)
        self.scale = nn.Conv2d(width, width, 1)
        self.mix = nn.Conv2d(2 * width, width, 1)

    def forward(self, q_s: torch.Tensor, q_a: torch.Tensor) -> torch.Tensor:
        h_s = self.proj_s(q_s)
        h_a = self.proj_a(q_a) * (1 + self.scale(h_s))
        return self.mix(torch.cat([h_s, h_a], dim=1))


def images_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 B x 3 x H x W -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def float_to_images(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 B x 3 x H x W."""
    return ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def class_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice of K-class logits B x K x H x W against class indices B x H x W, per sample and
    foreground class (background left out, as its Dice is near 1 and says little), averaged."""
    k = logits.shape[1]
    p = torch.softmax(logits, dim=1)[:, 1:].flatten(2)
    t = F.one_hot(target.long(), k).permute(0, 3, 1, 2)[:, 1:].flatten(2).to(p.dtype)
    return (1 - (2 * (p * t).sum(2) + eps) / (p.sum(2) + t.sum(2) + eps)).mean()


def shuffle_positions(codes: torch.Tensor, p: float) -> torch.Tensor:
    """Randomly permute the h x w positions of each of B code maps (B x d x h x w) with probability p."""
    b, d, h, w = codes.shape
    flat = codes.flatten(2)
    perm = torch.argsort(torch.rand(b, h * w, device=codes.device), dim=1)
    keep = torch.rand(b, device=codes.device) >= p
    perm[keep] = torch.arange(h * w, device=codes.device)
    return flat.gather(2, perm[:, None, :].expand(b, d, h * w)).view(b, d, h, w)


def same_label_partners(labels: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Row indices: with probability p a row gets another row of its label (where the batch has
    one), else itself."""
    labels = labels.cpu()
    rows = torch.arange(len(labels))
    others = (labels[:, None] == labels[None, :]) & (rows[:, None] != rows[None, :])
    # a uniform draw among each row's others: the largest of random scores where allowed
    scores = torch.rand(others.shape, generator=generator).masked_fill(~others, -1.0)
    swap = others.any(1) & (torch.rand(len(labels), generator=generator) < p)
    return torch.where(swap, scores.argmax(1), rows)


class DualVQTokenizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        width = cfg.channels[-1]
        self.structure_encoder = Encoder(cfg.mask_channels, cfg)
        self.appearance_encoder = Encoder(3, cfg)
        self.structure_vq = VectorQuantizer(cfg.structure_codes, cfg.code_dim, cfg.vq_beta, cfg.dead_code_steps)
        self.appearance_vq = VectorQuantizer(cfg.appearance_codes, cfg.code_dim, cfg.vq_beta, cfg.dead_code_steps)
        self.mask_in = nn.Conv2d(cfg.code_dim, width, 1)
        self.mask_decoder = Decoder(cfg.mask_channels, cfg)  # D_seg: reads structure codes only
        self.fusion = Fusion(cfg.code_dim, width)
        self.image_decoder = Decoder(3, cfg)  # D: reads the fused codes

    # ----- the API the later stages use -----
    def encode(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images B x 3 x H x W and masks B x 1 x H x W ({0,1}, or class indices) -> token
        grids (S, A), each B x h x w."""
        return self.encode_structure(masks), self.encode_appearance(images)

    def _structure_input(self, masks: torch.Tensor) -> torch.Tensor:
        """Masks B x 1 x H x W as the structure encoder reads them: as they are when binary,
        one-hot B x K x H x W otherwise."""
        if self.cfg.num_classes == 2:
            return masks.float()
        return F.one_hot(masks[:, 0].long(), self.cfg.num_classes).permute(0, 3, 1, 2).float()

    def encode_structure(self, masks: torch.Tensor) -> torch.Tensor:
        """Masks B x 1 x H x W -> structure tokens B x h x w (for mask-conditioned rendering)."""
        return self.structure_vq.assign_map(self.structure_encoder(self._structure_input(masks)))

    def encode_appearance(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images B x 3 x H x W -> appearance tokens B x h x w."""
        return self.appearance_vq.assign_map(self.appearance_encoder(images_to_float(images)))

    def decode_mask_logits(self, s: torch.Tensor) -> torch.Tensor:
        """Structure tokens B x h x w -> mask logits B x 1 x H x W (B x K x H x W for K > 2 classes),
        from S alone."""
        return self.mask_decoder(self.mask_in(self.structure_vq.lookup(s)))

    def decode_mask(self, s: torch.Tensor) -> torch.Tensor:
        """Structure tokens -> mask B x 1 x H x W uint8: {0,1}, or class indices for K > 2."""
        logits = self.decode_mask_logits(s)
        if self.cfg.num_classes == 2:
            return (logits > 0).to(torch.uint8)
        return logits.argmax(dim=1, keepdim=True).to(torch.uint8)

    def decode_image(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """(S, A) token grids -> uint8 RGB images B x 3 x H x W."""
        return float_to_images(self._image_from_codes(self.structure_vq.lookup(s), self.appearance_vq.lookup(a)))

    def decode(self, s: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, A) -> (uint8 images B x 3 x H x W, masks B x 1 x H x W as ``decode_mask``)."""
        return self.decode_image(s, a), self.decode_mask(s)

    # ----- training -----
    def _image_from_codes(self, q_s: torch.Tensor, q_a: torch.Tensor) -> torch.Tensor:
        return self.image_decoder(self.fusion(q_s, q_a))

    def forward(self, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """Losses of Eq. 9 for a batch (uint8 images, masks as ``encode``) plus the tokens and outputs.
        ``labels`` (B): in training with ``appearance_partner``, whose appearance codes may be swapped."""
        x = images_to_float(images)
        q_s, s, vq_s = self.structure_vq(self.structure_encoder(self._structure_input(masks)))
        q_a, a, vq_a = self.appearance_vq(self.appearance_encoder(x))
        if self.training and self.cfg.appearance_partner > 0 and labels is not None:
            q_a = q_a[same_label_partners(labels, self.cfg.appearance_partner).to(q_a.device)]
        if self.training and self.cfg.appearance_shuffle > 0:
            q_a = shuffle_positions(q_a, self.cfg.appearance_shuffle)
        x_hat = self._image_from_codes(q_s, q_a)
        m_logits = self.mask_decoder(self.mask_in(q_s))
        rec = F.l1_loss(x_hat.float(), x)
        if self.cfg.num_classes == 2:
            m = masks.float()
            seg = F.binary_cross_entropy_with_logits(m_logits.float(), m) + dice_loss(m_logits.float(), m)
        else:
            target = masks[:, 0].long()
            seg = F.cross_entropy(m_logits.float(), target) + class_dice_loss(m_logits.float(), target)
        loss = rec + vq_s + vq_a + seg
        return {"loss": loss, "rec": rec, "vq_structure": vq_s, "vq_appearance": vq_a, "seg": seg,
                "structure_tokens": s, "appearance_tokens": a, "image": x_hat, "mask_logits": m_logits}
