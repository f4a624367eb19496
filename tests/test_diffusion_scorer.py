"""The image-generation merge's pieces without a build (issue 23): captions, the scorer's normalised similarity and
Frechet distance against float64 oracles, and deterministic generation. Untrained models: seconds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from m2n2_lightning.diffusion import data
from m2n2_lightning.diffusion.models import make_unet
from m2n2_lightning.diffusion.sampling import generate, initial_noise
from m2n2_lightning.diffusion.scorer import ImageEncoder, frechet_distance, similarity
from m2n2_lightning.diffusion.text import encode, make_text_encoder, token_ids


@pytest.fixture(scope="module")
def encoder() -> ImageEncoder:
    torch.manual_seed(0)
    return ImageEncoder().eval()


def test_captions_name_the_same_content_in_both_languages() -> None:
    labels, styles = data.digits(), data.styles()
    for image in (0, 1, 500, 1796):
        en, ja = data.caption(image, "en").split(), data.caption(image, "ja").split()
        assert en == [data.STYLE_WORDS["en"][styles[image]], data.DIGIT_WORDS["en"][labels[image]]]
        assert ja == [data.STYLE_WORDS["ja"][styles[image]], data.DIGIT_WORDS["ja"][labels[image]]]
    # bold: more ink than the median training image of the digit (recomputed here from the raw pixels)
    pixels = (data.images() + 1.0) * 8.0
    ink = pixels.sum(dim=(1, 2, 3)).double()
    for digit in range(10):
        train_ink = ink[:1437][labels[:1437] == digit].numpy()
        assert (styles[labels == digit] == torch.from_numpy(ink[labels == digit].numpy() > np.median(train_ink))).all()
    assert 0.4 < float(styles[:1437].double().mean()) < 0.6
    assert data.RESOURCE_IMAGES.start == 1437 and data.TEST_IMAGES.stop == 1797
    assert not set(data.RESOURCE_IMAGES) & set(data.TEST_IMAGES)


def test_token_ids_and_bad_captions() -> None:
    vocab = data.vocabulary()
    ids = token_ids(["bold seven", "hosoi ni"])
    assert ids.tolist() == [[1, vocab.index("bold"), vocab.index("seven"), 2], [1, vocab.index("hosoi"), vocab.index("ni"), 2]]
    for bad in ("bold", "bold seven eight", "fat seven"):
        with pytest.raises(ValueError, match="not a style word and a digit word"):
            token_ids([bad])
    with pytest.raises(ValueError, match="language must be one of"):
        data.caption(0, "fr")


def test_similarity_is_the_normalised_cosine(encoder: ImageEncoder) -> None:
    generator = torch.Generator().manual_seed(1)
    generated, real = torch.rand(6, 1, 8, 8, generator=generator) * 2 - 1, data.images()[:6]
    got = similarity(encoder, generated, real)
    with torch.no_grad():
        a, b = encoder.features(generated).double().tolist(), encoder.features(real).double().tolist()
    for i in range(6):
        cos = sum(x * y for x, y in zip(a[i], b[i])) / math.sqrt(sum(x * x for x in a[i]) * sum(y * y for y in b[i]))
        assert float(got[i]) == pytest.approx((1 + cos) / 2, abs=1e-6)
    assert torch.allclose(similarity(encoder, real, real), torch.ones(6), atol=1e-6)  # an image scores 1 against itself


def test_frechet_distance_against_the_eigenvalue_formula(encoder: ImageEncoder) -> None:
    images = data.images()
    a, b = images[:200], images[1437:1637]
    with torch.no_grad():
        fa, fb = encoder.features(a).double().numpy(), encoder.features(b).double().numpy()
    ca, cb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    # tr((Ca Cb)^(1/2)) = sum of the square roots of the eigenvalues of Ca Cb (real, >= 0 for PSD Ca, Cb)
    root_trace = np.sqrt(np.clip(np.linalg.eigvals(ca @ cb).real, 0, None)).sum()
    expected = ((fa.mean(0) - fb.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * root_trace
    assert frechet_distance(encoder, a, b) == pytest.approx(expected, rel=1e-6)
    assert abs(frechet_distance(encoder, a, a)) < 1e-6 * np.trace(ca)
    with pytest.raises(ValueError, match="at least two images"):
        frechet_distance(encoder, a[:1], b)


def test_generation_is_fixed_per_caption_whatever_the_batch() -> None:
    torch.set_num_threads(1)
    unet, text = make_unet(16, 32, 0).eval(), make_text_encoder(32, 0).eval()
    captions = ["bold seven", "thin two", "futoi nana"]
    with torch.no_grad():
        states = encode(text, captions)
    images = generate(unet, states, [5, 9, 5], steps=3)
    assert torch.equal(images, generate(unet, states, [5, 9, 5], steps=3))
    alone = generate(unet, states[1:2], [9], steps=3)
    assert torch.allclose(images[1], alone[0], atol=1e-5)
    assert images.shape == (3, 1, 8, 8) and images.abs().max() <= 1
    assert torch.equal(initial_noise([5])[0], initial_noise([9, 5])[1])
    assert not torch.allclose(images[0], images[2])  # same noise, other caption (another word of the vocabulary)
    with pytest.raises(ValueError, match="one per caption"):
        generate(unet, states, [1, 2], steps=3)
