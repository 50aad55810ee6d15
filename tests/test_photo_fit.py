"""core.images.fit_photos: photo batches of different sizes (and their masks) fitted to one training resolution."""

from __future__ import annotations

import pytest
import torch

from core.errors import InputError
from core.images import fit_photos, fit_tensor, pair_masks


def _photo(height: int, width: int, value: float = 0.0) -> torch.Tensor:
    """One (1, 3, H, W) photo of a single value."""
    return torch.full((1, 3, height, width), value)


def _spot(height: int, width: int, rows: slice, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """A dark (1, 3, H, W) photo with a bright patch, and the (1, H, W) mask of exactly that patch."""
    photo = torch.full((1, 3, height, width), -0.8)
    photo[..., rows, cols] = 0.8
    mask = torch.zeros(1, height, width)
    mask[:, rows, cols] = 1.0
    return photo, mask


def test_photos_of_different_sizes_become_one_batch() -> None:
    photos = [_photo(64, 64, 0.1), _photo(40, 60, 0.2), torch.zeros(2, 3, 30, 45)]  # 512x512, 400x600, 300x451 scaled
    pixels, masks = fit_photos(photos, 16)
    assert pixels.shape == (4, 3, 16, 16) and masks is None
    torch.testing.assert_close(pixels[0], torch.full((3, 16, 16), 0.1))
    torch.testing.assert_close(pixels[1], torch.full((3, 16, 16), 0.2))
    torch.testing.assert_close(pixels[1:2], fit_tensor(photos[1], 16))  # each photo's own centre crop


def test_masks_are_cropped_with_their_photos() -> None:
    wide, wide_mask = _spot(48, 96, slice(8, 40), slice(40, 60))  # off-centre patch inside the kept middle
    tall, tall_mask = _spot(96, 48, slice(30, 50), slice(10, 38))
    pixels, masks = fit_photos([wide, tall], 32, [wide_mask, tall_mask])
    assert pixels.shape == (2, 3, 32, 32) and masks is not None and masks.shape == (2, 1, 32, 32)
    for photo, mask in zip(pixels, masks):  # the patch and its mask land on the same pixels
        inside, outside = mask[0] > 0.9, mask[0] < 0.1
        assert inside.sum() > 20 and outside.sum() > 20
        assert bool((photo[:, inside] > 0.6).all()) and bool((photo[:, outside] < -0.6).all())
    assert not torch.allclose(masks[0], masks[1])


def test_one_mask_serves_every_photo_of_its_size() -> None:
    mask = torch.zeros(1, 40, 60)
    mask[:, 10:30, 20:40] = 1.0
    _, masks = fit_photos([_photo(40, 60), torch.zeros(2, 3, 40, 60)], 16, [mask])
    assert masks is not None and masks.shape == (3, 1, 16, 16)
    assert torch.equal(masks[0], masks[2]) and float(masks.amax()) == 1.0
    _, two_d = fit_photos([_photo(40, 60)], 16, [mask[0]])  # a bare (H, W) mask works too
    assert two_d is not None and torch.equal(two_d[0], masks[0])


def test_one_mask_per_photo_across_batches() -> None:
    photos = [torch.zeros(2, 3, 20, 20), _photo(24, 32)]
    paired = pair_masks(photos, [torch.full((1, 20, 20), 0.5), torch.ones(1, 20, 20), torch.ones(24, 32)])
    assert [tuple(m.shape) for m in paired] == [(2, 20, 20), (1, 24, 32)]
    assert float(paired[0][0].max()) == 0.5 and float(paired[0][1].max()) == 1.0  # order kept, batches split differently


@pytest.mark.parametrize(
    ("masks", "message"),
    [
        ([torch.ones(3, 32, 32)], r"^mask: got 3 masks for 2 photos; give one mask for all, or one per photo"),
        ([torch.ones(32, 32)], r"^mask: the one mask is 32x32 but photo 2 is 48x24; .*one per photo"),
        ([torch.ones(32, 32), torch.ones(32, 48)], r"^mask: mask 2 is 48x32 but photo 2 is 48x24; "),
        ([torch.ones(32, 32), torch.zeros(24, 48)], r"^mask: a mask is empty"),
        ([torch.ones(2, 1, 32, 32)], r"^mask: input 1 is not a \(count, height, width\) mask"),
    ],
)
def test_mask_mistakes_name_the_input_and_the_fix(masks: list[torch.Tensor], message: str) -> None:
    with pytest.raises(InputError, match=message):
        fit_photos([_photo(32, 32), _photo(24, 48)], 16, masks)


def test_photo_mistakes_name_the_input_and_the_fix() -> None:
    with pytest.raises(InputError, match=r"^images: got no photos; connect at least one"):
        fit_photos([], 16)
    with pytest.raises(InputError, match=r"^images: input 2 is not a batch of RGB photos"):
        fit_photos([_photo(32, 32), torch.zeros(1, 4, 32, 32)], 16)
    with pytest.raises(InputError, match=r"^resolution: "):
        fit_photos([_photo(32, 32)], 12)
