"""Sampler: logit filtering, classifier-free guidance, KV-cache decoding, seeding, chunking."""
from __future__ import annotations

import contextlib

import pytest
import torch

from pathar_aug.config import from_preset
from pathar_aug.prior import PRIOR_PRESETS, InterleavedPrior
from pathar_aug.sampler import (
    GuidedDecoder,
    SamplingConfig,
    filter_logits,
    sample_from_logits,
    sample_tokens,
    sample_tokens_nocache,
)
from pathar_aug.reporter import Reporter, Task

from tests.conftest import GRID, K_A, K_S, LABELS, N


pytestmark = pytest.mark.usefixtures("one_thread")


class RecordingReporter(Reporter):
    """Remembers how far each task it opened got."""

    def __init__(self):
        super().__init__(lambda _: None)
        self.completed: list[float] = []

    @contextlib.contextmanager
    def task(self, description, total=None, completed=0):
        self.completed.append(completed)
        k = len(self.completed) - 1
        outer = self

        class Recording(Task):
            def advance(self, n=1, info=None):
                outer.completed[k] += n

            def update(self, completed=None, info=None):
                if completed is not None:
                    outer.completed[k] = completed

        yield Recording()


@pytest.fixture(scope="module")
def prior() -> InterleavedPrior:
    torch.manual_seed(0)
    cfg = from_preset(PRIOR_PRESETS, "tiny", n_embd=32)
    model = InterleavedPrior(cfg, K_S, K_A, GRID, LABELS).eval()
    with torch.no_grad():  # sharpen the random label embeddings so guidance has an effect
        model.label_emb.weight.mul_(20)
    return model


def cfg(**overrides) -> SamplingConfig:
    base = dict(guidance=1.5, temperature=1.0, top_k=0, top_p=1.0, batch_size=8, seed=0)
    return SamplingConfig(**(base | overrides))


# ----- filtering ---------------------------------------------------------------------------------
def allowed_reference(logits: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """Top-k by sorting, then the smallest most-likely prefix whose mass reaches top_p."""
    order = logits.argsort(descending=True).tolist()
    kept = order[:top_k] if top_k > 0 else order
    probs = logits[kept].softmax(0)
    chosen, mass = [], 0.0
    for token, p in zip(kept, probs.tolist()):
        chosen.append(token)
        mass += p
        if mass >= top_p:
            break
    return set(chosen)


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (20, 0.8), (3, 0.999), (64, 0.0)])
def test_filter_logits_keeps_exactly_the_top_k_top_p_set(top_k, top_p):
    g = torch.Generator().manual_seed(top_k)
    logits = torch.randn(6, 64, generator=g) * 2
    out = filter_logits(logits, top_k, top_p)
    for row in range(6):
        kept = set(torch.isfinite(out[row]).nonzero().flatten().tolist())
        assert kept == allowed_reference(logits[row], top_k, top_p)
        assert torch.equal(out[row][list(kept)], logits[row][list(kept)])  # kept logits untouched
    assert torch.equal(filter_logits(logits, 0, 1.0), logits)


def test_sampling_never_leaves_the_allowed_set():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, generator=g).repeat(4000, 1)
    for top_k, top_p in ((7, 1.0), (0, 0.5), (10, 0.7)):
        allowed = allowed_reference(logits[0] / 0.85, top_k, top_p)
        drawn = sample_from_logits(logits, cfg(temperature=0.85, top_k=top_k, top_p=top_p), g)
        seen = set(drawn.tolist())
        assert seen <= allowed
        assert len(seen) > 1  # the draw really is random within the set
    unfiltered = set(sample_from_logits(logits, cfg(top_k=0, top_p=1.0), g).tolist())
    assert not unfiltered <= allowed  # and without filtering it would have left the set
    greedy = sample_from_logits(logits[:3], cfg(temperature=0.0), g)
    assert torch.equal(greedy, logits[:3].argmax(-1))


def test_sampling_follows_the_filtered_distribution():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(32, generator=g) * 1.5
    scfg = cfg(temperature=0.85, top_k=10, top_p=0.9)
    expected = filter_logits(logits / 0.85, 10, 0.9).softmax(-1)
    drawn = sample_from_logits(logits.repeat(20000, 1), scfg, g)
    observed = torch.bincount(drawn, minlength=32).float() / len(drawn)
    assert (observed - expected).abs().max() < 0.015


# ----- guidance ----------------------------------------------------------------------------------
def decode_logits(prior, labels, guidance, S, A):
    decoder = GuidedDecoder(prior, labels, guidance)
    s_steps, a_steps = [decoder.start()], []
    a_prev = torch.full((len(labels),), prior.appearance_start)
    for i in range(1, N + 1):
        s, a = decoder.step(i, S[:, i - 1], a_prev)
        s_steps.append(s)
        a_steps.append(a)
        a_prev = A[:, i - 1]
    return decoder, torch.stack(s_steps[:N], 1), torch.stack(a_steps, 1)


def test_guidance_one_equals_conditional_logits_and_other_scales_extrapolate(prior):
    g = torch.Generator().manual_seed(3)
    S, A = torch.randint(K_S, (2, N), generator=g), torch.randint(K_A, (2, N), generator=g)
    labels = torch.tensor([0, 2])
    with torch.inference_mode():
        cond_s, cond_a = prior(S, A, labels)
        null_s, null_a = prior(S, A, torch.full_like(labels, prior.null_label))
        decoder, s1, a1 = decode_logits(prior, labels, 1.0, S, A)
        assert decoder.cache.batch_size == 2  # no batch doubling at guidance 1
        assert torch.allclose(s1, cond_s, atol=1e-5) and torch.allclose(a1, cond_a, atol=1e-5)
        decoder, s3, a3 = decode_logits(prior, labels, 3.0, S, A)
        assert decoder.cache.batch_size == 4
    assert torch.allclose(s3, null_s + 3.0 * (cond_s - null_s), atol=1e-4)
    assert torch.allclose(a3, null_a + 3.0 * (cond_a - null_a), atol=1e-4)
    assert not torch.allclose(s3, cond_s, atol=1e-3)


# ----- sampling ----------------------------------------------------------------------------------
def test_sample_shapes_ranges_and_seeding(prior):
    labels = torch.tensor([0, 1, 2, 1])
    S, A = sample_tokens(prior, labels, cfg(seed=7), "cpu")
    assert S.shape == A.shape == (4, *GRID) and S.dtype == A.dtype == torch.long
    assert 0 <= S.min() and S.max() < K_S and 0 <= A.min() and A.max() < K_A
    S2, A2 = sample_tokens(prior, labels, cfg(seed=7), "cpu")
    assert torch.equal(S, S2) and torch.equal(A, A2)
    S3, A3 = sample_tokens(prior, labels, cfg(seed=8), "cpu")
    assert not (torch.equal(S, S3) and torch.equal(A, A3))


def test_cached_and_nocache_samplers_agree(prior):
    labels = torch.tensor([2, 0, 1])
    fast = sample_tokens(prior, labels, cfg(seed=3), "cpu")
    slow = sample_tokens_nocache(prior, labels, cfg(seed=3), "cpu")
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


def test_mask_conditioned_sampling_returns_given_structure(prior):
    g = torch.Generator().manual_seed(5)
    given = torch.randint(K_S, (5, *GRID), generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1])
    S, A = sample_tokens(prior, labels, cfg(batch_size=2), "cpu", structure=given)
    assert torch.equal(S, given)
    S_free, _ = sample_tokens(prior, labels, cfg(batch_size=2), "cpu")
    assert not torch.equal(S_free, given)
    # greedy appearance is rendered on the given structure: A is the argmax of the teacher-forced
    # appearance logits of (given, A) at every location
    S, A = sample_tokens(prior, labels, cfg(batch_size=2, temperature=0.0, guidance=1.0), "cpu", structure=given)
    with torch.no_grad():
        _, a_logits = prior(given, A, labels)
    assert torch.equal(S, given) and torch.equal(a_logits.argmax(-1).view_as(A), A)
    with pytest.raises(ValueError):
        sample_tokens(prior, labels, cfg(), "cpu", structure=given.clamp(max=0) + K_S)


def test_labels_steer_samples(prior):
    # greedy decoding: identical labels give identical samples, different labels differ
    greedy = cfg(temperature=0.0, guidance=3.0)
    S, A = sample_tokens(prior, torch.tensor([0, 0, 1, 2]), greedy, "cpu")
    assert torch.equal(S[0], S[1]) and torch.equal(A[0], A[1])
    assert not (torch.equal(A[0], A[2]) and torch.equal(A[0], A[3]))


def test_chunked_batches(prior, monkeypatch):
    labels = torch.tensor([0, 1, 2, 0, 1])
    rows = []
    new_cache = prior.new_cache
    monkeypatch.setattr(prior, "new_cache", lambda b, **kw: rows.append(b) or new_cache(b, **kw))
    bar = RecordingReporter()
    S, A = sample_tokens(prior, labels, cfg(batch_size=2, seed=11), "cpu", progress=bar)
    assert bar.completed[0] == 5
    assert rows == [4, 4, 2]  # chunks of 2, 2, 1 images, doubled for guidance
    assert S.shape == A.shape == (5, *GRID)
    # the first chunk sees a fresh generator, exactly like sampling its labels alone
    S0, A0 = sample_tokens(prior, labels[:2], cfg(batch_size=2, seed=11), "cpu")
    assert torch.equal(S[:2], S0) and torch.equal(A[:2], A0)
    # chunks are not copies of each other
    assert not torch.equal(A[:2], A[2:4])


@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_a_chunk_takes_n_plus_one_forward_steps(prior, monkeypatch, guidance):
    # 2N tokens per image from N + 1 forward calls of the prior per chunk: CLS, then [s_i, a_(i-1)]
    calls = []
    for name in ("start", "step", "prefix_logits", "forward"):
        original = getattr(prior, name)
        monkeypatch.setattr(prior, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    labels = torch.tensor([0, 1, 2, 0, 1])
    S, A = sample_tokens(prior, labels, cfg(batch_size=2, guidance=guidance), "cpu")
    chunks = 3  # 2 + 2 + 1 images
    assert S.shape == A.shape == (5, *GRID)
    assert calls.count("start") == chunks and calls.count("step") == chunks * N
    assert len(calls) == chunks * (N + 1)  # nothing else runs the network
    calls.clear()
    sample_tokens_nocache(prior, labels, cfg(batch_size=5, guidance=guidance), "cpu")
    assert calls.count("prefix_logits") == N + 1 and len(calls) == N + 1


def test_sampler_restores_training_mode_and_rejects_bad_labels(prior):
    prior.train()
    sample_tokens(prior, [0], cfg(), "cpu")
    assert prior.training
    prior.eval()
    with pytest.raises(ValueError, match="labels"):
        sample_tokens(prior, [LABELS + 1], cfg(), "cpu")


def test_labels_with_their_own_setting_are_sampled_with_it(prior):
    labels = torch.tensor([0, 1, 0, 1, 2])
    base = sample_tokens(prior, labels, cfg(seed=4), "cpu")
    # a label setting equal to the common one changes nothing
    same = sample_tokens(prior, labels, cfg(seed=4, by_label={1: {"temperature": cfg().temperature}}), "cpu")
    assert torch.equal(base[0], same[0]) and torch.equal(base[1], same[1])
    # label 1 greedy, the rest as before: label 1's rows are what greedy sampling gives them alone;
    # labels 0 and 2 come first in the random stream, as if sampled without label 1
    mixed = sample_tokens(prior, labels, cfg(seed=4, by_label={1: {"temperature": 0.0}}), "cpu")
    greedy = sample_tokens(prior, torch.tensor([1, 1]), cfg(seed=99, temperature=0.0), "cpu")
    rest = sample_tokens(prior, torch.tensor([0, 0, 2]), cfg(seed=4), "cpu")
    for out, alone in zip(mixed, greedy):
        assert torch.equal(out[[1, 3]], alone)
    for out, alone in zip(mixed, rest):
        assert torch.equal(out[[0, 2, 4]], alone)
