import dataclasses

import numpy as np
import pytest
import torch

from pathar_aug.config import from_preset
from pathar_aug.ingest import load_pairs
from pathar_aug.metrics import reconstruction_report
from pathar_aug.patches import make_patches
from pathar_aug.quantizer import VectorQuantizer, codebook_usage
from pathar_aug.tokenizer import TOKENIZER_PRESETS, DualVQTokenizer
from pathar_aug.train_tokenizer import build_token_cache, load_tokenizer, train_tokenizer
from tests.conftest import write_pair_folders


def test_straight_through_gradient_reaches_the_encoder_output():
    vq = VectorQuantizer(16, 4)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    q, _, _ = vq(z)
    weight = torch.randn_like(q)
    (q * weight).sum().backward()
    # straight-through: dq/dz is the identity up to the normalisation's Jacobian, so it is nonzero
    assert z.grad is not None and z.grad.abs().sum() > 0
    # and the forward value is exactly the chosen (normalised) code
    idx = vq.assign_map(z.detach())
    torch.testing.assert_close(q.detach(), vq.lookup(idx), rtol=1e-5, atol=1e-5)


def test_nearest_code_assignment_is_the_cosine_argmax():
    vq = VectorQuantizer(8, 3).eval()
    codes = vq.codes().detach()
    z = codes[[5, 2, 7]] * torch.tensor([[2.0], [0.5], [3.0]]) + 0.01 * torch.randn(3, 3)
    assert vq.assign(z).tolist() == [5, 2, 7]
    zs = torch.randn(50, 3)
    dists = torch.cdist(torch.nn.functional.normalize(zs, dim=-1), codes)
    assert torch.equal(vq.assign(zs), dists.argmin(dim=-1))


def test_dead_code_restart_raises_usage():
    torch.manual_seed(0)
    data = torch.randn(256, 4) * torch.tensor([1.0, 1.0, 0.1, 0.1])

    def usage_after(dead_after: int) -> float:
        torch.manual_seed(1)
        vq = VectorQuantizer(64, 4, dead_after=dead_after)
        vq.initialised.fill_(True)  # start from a collapsed codebook: every code in one corner
        vq.codebook.weight.data = torch.tensor([1.0, 0, 0, 0]) + 0.01 * torch.randn(64, 4)
        vq.train()
        for _ in range(30):
            vq(data.t().reshape(1, 4, 16, 16))
        return codebook_usage(vq.assign(data), 64)

    assert usage_after(dead_after=5) > usage_after(dead_after=10_000) + 0.3


@pytest.mark.parametrize("preset", ["tiny", "cpu", "paper"])
def test_shapes_for_every_preset(preset):
    cfg = TOKENIZER_PRESETS[preset]
    model = DualVQTokenizer(cfg).eval()
    p, (h, w) = cfg.patch_size, cfg.grid
    images = torch.randint(0, 256, (2, 3, p, p), dtype=torch.uint8)
    masks = (torch.rand(2, 1, p, p) > 0.5).to(torch.uint8)
    with torch.no_grad():
        s, a = model.encode(images, masks)
        assert s.shape == a.shape == (2, h, w)
        assert s.max() < cfg.structure_codes and a.max() < cfg.appearance_codes
        img, msk = model.decode(s, a)
    assert img.shape == (2, 3, p, p) and img.dtype == torch.uint8
    assert msk.shape == (2, 1, p, p) and set(msk.unique().tolist()) <= {0, 1}


def test_mask_decoder_does_not_depend_on_appearance():
    cfg = TOKENIZER_PRESETS["tiny"]
    model = DualVQTokenizer(cfg).eval()
    h, w = cfg.grid
    s = torch.randint(0, cfg.structure_codes, (2, h, w))
    a1, a2 = torch.randint(0, cfg.appearance_codes, (2, 2, h, w))
    with torch.no_grad():
        _, m1 = model.decode(s, a1)
        _, m2 = model.decode(s, a2)
        i1, i2 = model.decode_image(s, a1), model.decode_image(s, a2)
    # decode's mask is the mask decoder's reading of S alone, whichever appearance comes with it
    assert torch.equal(m1, (model.decode_mask_logits(s) > 0).to(torch.uint8))
    assert torch.equal(m1, m2)
    assert not torch.equal(i1, i2)  # the image decoder does read A
    # and the mask decoder has no path from A: no appearance parameter gets a gradient from it
    model.zero_grad()
    model.decode_mask_logits(s).sum().backward()
    assert all(p.grad is None for p in model.appearance_vq.parameters())
    assert all(p.grad is None for p in model.appearance_encoder.parameters())


def test_paper_preset_with_paper_prior_lands_near_170m_parameters():
    from pathar_aug.prior import PRIOR_PRESETS, InterleavedPrior

    tok = DualVQTokenizer(TOKENIZER_PRESETS["paper"])
    prior = InterleavedPrior(PRIOR_PRESETS["paper"], 1024, 1024, grid=(16, 16), num_labels=3)
    total = sum(p.numel() for m in (tok, prior) for p in m.parameters()) / 1e6
    assert 160 < total < 180, total  # paper: 170.73 M


def test_flags_override_preset_fields():
    cfg = from_preset(TOKENIZER_PRESETS, "tiny", steps=7, lr=None)
    assert cfg.steps == 7 and cfg.lr == TOKENIZER_PRESETS["tiny"].lr
    with pytest.raises(ValueError, match="no field"):
        from_preset(TOKENIZER_PRESETS, "tiny", stepz=3)
    with pytest.raises(ValueError, match="unknown preset"):
        from_preset(TOKENIZER_PRESETS, "huge")


def test_training_learns_resumes_and_writes_its_files(tmp_path):
    images, masks = write_pair_folders(tmp_path / "data", n=6, size=32)
    patches = make_patches(load_pairs(images, masks), 32)
    cfg = dataclasses.replace(TOKENIZER_PRESETS["tiny"], steps=60, ckpt_every=30)
    device = torch.device("cpu")
    model0 = DualVQTokenizer(cfg)
    before = reconstruction_report(model0, patches, device)["nuclei"]
    half = dataclasses.replace(cfg, steps=30)
    train_tokenizer(patches, tmp_path / "run", half, device, show_progress=False)
    with pytest.raises(FileExistsError):
        train_tokenizer(patches, tmp_path / "run", cfg, device, show_progress=False)
    ckpt = train_tokenizer(patches, tmp_path / "run", cfg, device, resume=True, show_progress=False)
    assert torch.load(ckpt, weights_only=False)["step"] == 60
    rows = (tmp_path / "run" / "tokenizer_loss.csv").read_text().strip().splitlines()
    steps = [int(r.split(",")[0]) for r in rows[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # resumed without duplicated rows
    assert (tmp_path / "run" / "tokenizer_preview.png").stat().st_size > 0
    model = load_tokenizer(ckpt)
    after = reconstruction_report(model, patches, device)["nuclei"]
    assert after["psnr"] > before["psnr"] + 3
    assert after["mask_dice"] > before["mask_dice"]
    cache = torch.load(build_token_cache(model, patches, tmp_path / "tokens.pt", device), weights_only=False)
    assert cache["structure"].shape == (8 * len(patches), *cfg.grid)
    assert cache["label_names"] == ["nuclei"] and cache["num_appearance_codes"] == cfg.appearance_codes


def test_appearance_shuffle_moves_codes_not_values():
    from pathar_aug.tokenizer import shuffle_positions

    codes = torch.randn(6, 4, 3, 5)
    assert torch.equal(shuffle_positions(codes, 0.0), codes)
    torch.manual_seed(0)
    shuffled = shuffle_positions(codes, 1.0)
    for b in range(6):
        before, after = codes[b].flatten(1).T, shuffled[b].flatten(1).T  # positions x channels
        # the same code vectors, each moved as a whole, to other places
        assert sorted(map(tuple, before.tolist())) == sorted(map(tuple, after.tolist()))
    assert not torch.equal(shuffled, codes)


def test_shuffled_appearance_only_in_training():
    cfg = from_preset(TOKENIZER_PRESETS, "tiny", appearance_shuffle=1.0)
    model = DualVQTokenizer(cfg).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    masks = (torch.rand(2, 1, 32, 32) > 0.5).to(torch.uint8)
    with torch.no_grad():
        s, a = model.encode(images, masks)
        first, second = model.decode_image(s, a), model.decode_image(s, a)
        assert torch.equal(first, second)  # decoding is deterministic: no shuffle outside training
        assert torch.equal(model(images, masks)["image"], model(images, masks)["image"])
        model.train()
        torch.manual_seed(1)
        assert not torch.equal(model(images, masks)["image"], model(images, masks)["image"])
    with pytest.raises(ValueError, match="appearance_shuffle"):
        from_preset(TOKENIZER_PRESETS, "tiny", appearance_shuffle=1.5)


def test_appearance_partners_stay_within_the_label():
    from pathar_aug.tokenizer import same_label_partners

    labels = torch.tensor([0, 1, 0, 2, 1, 0, 1, 0])  # label 2 has a single row: it keeps its own codes
    assert torch.equal(same_label_partners(labels, 0.0), torch.arange(8))
    generator = torch.Generator().manual_seed(0)
    partner = same_label_partners(labels, 1.0, generator)
    assert torch.equal(labels[partner], labels)
    moved = partner != torch.arange(8)
    assert moved.tolist() == [True, True, True, False, True, True, True, True]


def test_appearance_partner_changes_training_only_where_the_label_repeats():
    cfg = from_preset(TOKENIZER_PRESETS, "tiny", appearance_partner=1.0)
    model = DualVQTokenizer(cfg)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    masks = (torch.rand(3, 1, 32, 32) > 0.5).to(torch.uint8)
    with torch.no_grad():
        model.train()(images, masks)  # the first training forward initialises the codebooks
        plain = model(images, masks)["image"]
        alone = model(images, masks, torch.tensor([0, 1, 2]))["image"]  # no partner of any label
        paired = model(images, masks, torch.tensor([0, 0, 2]))["image"]
    assert torch.allclose(alone, plain, atol=1e-6)
    assert not torch.allclose(paired[:2], plain[:2], atol=1e-4)  # the two rows of label 0 traded codes
    assert torch.allclose(paired[2], plain[2], atol=1e-6)
    with pytest.raises(ValueError, match="appearance_partner"):
        from_preset(TOKENIZER_PRESETS, "tiny", appearance_partner=-0.1)


def test_train_takes_the_partner_share_from_the_command_line_and_keeps_it_on_resume(tmp_path):
    from typer.testing import CliRunner

    from pathar_aug.cli import app
    from pathar_aug.pipeline import RunError, RunInfo, apply_resume_options
    from tests.conftest import train_tiny_run

    trained = train_tiny_run(tmp_path, "--appearance-partner", "0.5", "--tokenizer-steps", "2", "--prior-steps", "2")
    run = trained["run"]
    bad = CliRunner().invoke(app, ["train", "--images", str(trained["images"]), "--masks", str(trained["masks"]),
                                   "--preset", "tiny", "--out", str(tmp_path / "bad"), "--appearance-partner", "1.5",
                                   "--quiet"])
    assert bad.exit_code != 0 and "appearance_partner is a probability" in bad.output
    assert not (tmp_path / "bad" / "run.json").exists()
    stored = RunInfo.load(run).settings
    assert stored.tokenizer.appearance_partner == 0.5
    assert torch.load(run / "tokenizer" / "tokenizer.pt", weights_only=False)["config"]["appearance_partner"] == 0.5
    assert apply_resume_options(run, stored, {"appearance_partner": 0.5}) == stored  # the same share: fine
    with pytest.raises(RunError, match="--appearance-partner 0.2 differs from the run"):
        apply_resume_options(run, stored, {"appearance_partner": 0.2})


# ---------------------------------------------------------------------- multi-class masks
def test_k_way_tokenizer_shapes_and_loss():
    cfg = dataclasses.replace(TOKENIZER_PRESETS["tiny"], num_classes=3)
    model = DualVQTokenizer(cfg)
    p, (h, w) = cfg.patch_size, cfg.grid
    assert model.structure_encoder.net[0].in_channels == 3  # one-hot classes in
    assert model.mask_decoder.net[-1].out_channels == 3  # one logit per class out
    images = torch.randint(0, 256, (4, 3, p, p), dtype=torch.uint8)
    masks = torch.randint(0, 3, (4, 1, p, p), dtype=torch.uint8)
    out = model(images, masks)
    assert out["mask_logits"].shape == (4, 3, p, p) and out["structure_tokens"].shape == (4, h, w)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    # L_seg is cross-entropy + soft Dice over the foreground classes
    from pathar_aug.tokenizer import class_dice_loss

    logits, target = out["mask_logits"].float(), masks[:, 0].long()
    expected = torch.nn.functional.cross_entropy(logits, target) + class_dice_loss(logits, target)
    torch.testing.assert_close(out["seg"], expected)
    out["loss"].backward()
    assert model.structure_encoder.net[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        s, a = model.encode(images, masks)
        img, msk = model.decode(s, a)
    assert img.shape == (4, 3, p, p) and msk.shape == (4, 1, p, p) and msk.dtype == torch.uint8
    assert set(msk.unique().tolist()) <= {0, 1, 2}
    assert torch.equal(msk, model.decode_mask_logits(s).argmax(1, keepdim=True).to(torch.uint8))
    with pytest.raises(ValueError, match="num_classes"):
        dataclasses.replace(cfg, num_classes=1)


def test_binary_tokenizer_keeps_bce_and_dice_on_one_channel():
    cfg = TOKENIZER_PRESETS["tiny"]
    assert cfg.num_classes == 2 and cfg.mask_channels == 1
    model = DualVQTokenizer(cfg)
    assert model.structure_encoder.net[0].in_channels == 1 and model.mask_decoder.net[-1].out_channels == 1
    p = cfg.patch_size
    images = torch.randint(0, 256, (2, 3, p, p), dtype=torch.uint8)
    masks = (torch.rand(2, 1, p, p) > 0.5).to(torch.uint8)
    out = model(images, masks)
    from pathar_aug.tokenizer import dice_loss

    logits, m = out["mask_logits"].float(), masks.float()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, m) + dice_loss(logits, m)
    assert out["mask_logits"].shape == (2, 1, p, p)
    torch.testing.assert_close(out["seg"], expected)


def test_binary_checkpoint_without_num_classes_loads(tmp_path):
    """Checkpoints written before multi-class masks existed have no num_classes: they are binary."""
    from pathar_aug.config import to_dict
    from pathar_aug.training import save_checkpoint

    cfg = TOKENIZER_PRESETS["tiny"]
    model = DualVQTokenizer(cfg)
    config = to_dict(cfg)
    del config["num_classes"]
    save_checkpoint(tmp_path / "tokenizer.pt", model=model.state_dict(), optimizer={}, step=cfg.steps,
                    config=config, label_names=["nuclei"])
    loaded = load_tokenizer(tmp_path / "tokenizer.pt")
    assert loaded.cfg.num_classes == 2
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_k_way_tokenizer_learns_class_maps(tmp_path):
    from pathar_aug.ingest import Sample
    from pathar_aug.mask_classes import BORDER_CLASSES, class_samples
    from tests.conftest import touching_nuclei

    rng = np.random.default_rng(0)
    samples = []
    for i in range(6):
        image, instances = touching_nuclei(32, rng, n=4, radius=(4, 7))
        samples.append(Sample(f"s{i}", image, instances, "nuclei", tmp_path / f"s{i}.png", tmp_path / f"m{i}.png"))
    patches = make_patches(class_samples(samples, BORDER_CLASSES, "border"), 32)
    assert set(patches.masks.unique().tolist()) == {0, 1, 2}
    cfg = dataclasses.replace(TOKENIZER_PRESETS["tiny"], num_classes=3, steps=40, ckpt_every=40)
    device = torch.device("cpu")
    before = reconstruction_report(DualVQTokenizer(cfg), patches, device)["nuclei"]
    ckpt = train_tokenizer(patches, tmp_path / "run", cfg, device, show_progress=False)
    after = reconstruction_report(load_tokenizer(ckpt), patches, device)["nuclei"]
    assert {"mask_dice_class1", "mask_dice_class2", "baseline_mask_dice_class2"} <= set(after)
    assert after["mask_dice"] > before["mask_dice"] and after["mask_dice_class1"] > before["mask_dice_class1"]
