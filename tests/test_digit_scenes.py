"""The built-in digit_scenes dataset: deterministic scenes whose boxes, instance masks and semantic map agree,
drawn for train and val from disjoint digits; and digit_views, kept once drawn."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from xcit.data.datasets import digits_split
from xcit.data.scenes import DigitScenes, masks_to_boxes


@pytest.fixture(scope='module')
def train():
    return DigitScenes('train', length=40, seed=3)


def test_scenes_are_a_function_of_seed_split_and_index(train):
    image, target = train[7]
    again_image, again_target = DigitScenes('train', length=40, seed=3)[7]
    assert torch.equal(image, again_image) and torch.equal(target['masks'], again_target['masks'])
    assert not torch.equal(train[8][0][:, :64, :64], image[:, :64, :64])
    other_seed = DigitScenes('train', length=40, seed=4)[7][0]
    assert other_seed.shape != image.shape or not torch.equal(other_seed, image)
    code = ('from xcit.data.scenes import DigitScenes; import torch; '
            'print(float(DigitScenes("train", length=40, seed=3)[7][0].sum()))')
    # another process with other string hashes (Python's differ per process, unless fixed): the scenes do not
    hash_seed = '2' if os.environ.get('PYTHONHASHSEED') == '1' else '1'
    other = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                           env={**os.environ, 'PYTHONHASHSEED': hash_seed}).stdout
    assert abs(float(other) - float(image.sum())) < 1e-3


def test_boxes_masks_and_semantic_map_agree(train):
    for index in range(len(train)):
        image, target = train[index]
        H, W = image.shape[-2:]
        assert 128 <= H <= 256 and 128 <= W <= 256 and image.min() >= 0 and image.max() <= 1
        masks, labels, boxes = target['masks'].bool(), target['labels'], target['boxes']
        assert 1 <= len(labels) <= 6 and masks.shape == (len(labels), H, W)
        assert labels.min() >= 1 and labels.max() <= 10
        assert torch.equal(masks_to_boxes(masks), boxes.as_subclass(torch.Tensor))  # tight around each mask
        assert masks.sum(0).max() <= 1  # one owner per pixel: later digits cover earlier ones
        semantic = target['semantic']
        expected = torch.zeros(H, W, dtype=torch.long)
        for mask, label in zip(masks, labels):
            expected[mask] = label
        assert torch.equal(semantic.as_subclass(torch.Tensor), expected)


def test_train_and_val_scenes_use_disjoint_digits(train):
    val = DigitScenes('val', length=40, seed=3)
    assert not set(digits_split('train')[2]) & set(digits_split('val')[2])
    used = {split: {int(i) for k in range(40) for i in ds[k][1]['digit_index']} for split, ds in
            (('train', train), ('val', val))}
    assert used['train'] <= set(digits_split('train')[2].tolist())
    assert used['val'] <= set(digits_split('val')[2].tolist())


def test_masks_to_boxes_uses_pixel_edges():
    masks = torch.zeros(2, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 9, 11] = True
    assert masks_to_boxes(masks).tolist() == [[3, 2, 9, 5], [11, 9, 12, 10]]


@pytest.mark.parametrize('kwargs', [dict(min_side=300, max_side=200), dict(digit_sizes=(4, 30)),
                                    dict(max_digits=0), dict(split='test')])
def test_impossible_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        DigitScenes(**kwargs)


def _box_overlap(a, b):
    w = (min(a[2], b[2]) - max(a[0], b[0])).clamp(min=0)
    h = (min(a[3], b[3]) - max(a[1], b[1])).clamp(min=0)
    return float(w * h)


def test_digits_hide_little_of_each_other():
    scenes = DigitScenes('train', length=40, seed=3, max_digits=6, min_side=96, max_side=144, digit_sizes=(24, 48))
    worst, count = 0.0, 0
    for i in range(len(scenes)):
        boxes = scenes[i][1]['boxes']
        count += len(boxes)
        for j in range(len(boxes)):
            for k in range(j + 1, len(boxes)):
                smaller = min(float((b[2] - b[0]) * (b[3] - b[1])) for b in (boxes[j], boxes[k]))
                worst = max(worst, _box_overlap(boxes[j], boxes[k]) / smaller)
    assert count > 80  # crowded scenes, yet each digit stays mostly in view
    assert worst <= 0.6


def test_kept_digit_views_equal_fresh_renders_and_stay_unchanged(monkeypatch):
    from xcit.data import views
    kept = views.DigitViews('val', size=24, seed=5)
    first = np.asarray(kept.load(11))
    written = kept.load(11)
    written.paste((255, 0, 0), (0, 0, 24, 24))  # a transform that draws into its input changes nothing kept
    monkeypatch.setattr(views, 'CACHE_BYTES', 0)
    fresh = views.DigitViews('val', size=24, seed=5)  # keeps nothing: every load renders anew
    assert np.array_equal(np.asarray(kept.load(11)), first)
    assert np.array_equal(np.asarray(fresh.load(11)), first) and not fresh._rendered
    assert not np.array_equal(np.asarray(fresh.load(12)), first)
    assert not np.array_equal(np.asarray(views.DigitViews('val', size=24, seed=6).load(11)), first)


def _digit_at(view: np.ndarray, size: int) -> tuple[tuple[int, int], np.ndarray]:
    """The grid place of a digit_places view's ink, and the (size/2)^2 block there; asserts nothing lies outside."""
    step, side = size // 8, size // 2
    rows, cols = np.nonzero(view[..., 0])
    top, left = rows.min() // step * step, cols.min() // step * step
    assert rows.max() < top + side and cols.max() < left + side  # all the ink inside one block
    assert (view[..., 0] == view[..., 1]).all() and (view[..., 0] == view[..., 2]).all()  # white on black
    return (top // step, left // step), view[top:top + side, left:left + side, 0]


def test_digit_places_show_the_digits_drawing_at_a_grid_place_chosen_by_seed_split_and_index():
    from xcit.data.datasets import DigitsSource
    from xcit.data.views import DigitPlaces
    size = 32
    source, drawn = DigitPlaces('val', size=size, seed=3), DigitsSource('val', size=size // 2)
    places = set()
    for i in range(40):
        view = np.asarray(source.load(i))
        assert view.shape == (size, size, 3)
        assert np.array_equal(view, np.asarray(DigitPlaces('val', size=size, seed=3).load(i)))
        place, block = _digit_at(view, size)
        assert max(place) < 5
        assert np.array_equal(block, np.asarray(drawn.load(i))[..., 0])
        places.add(place)
    assert len(places) > 10  # 25 places: 40 draws land on many of them
    other = DigitPlaces('val', size=size, seed=4)
    assert any(_digit_at(np.asarray(other.load(i)), size)[0] != _digit_at(np.asarray(source.load(i)), size)[0]
               for i in range(5))
    assert len(DigitPlaces('train', size=size, views=3)) == 3 * len(DigitPlaces('train', size=size))


def test_digit_places_draws_of_one_sample_show_its_digit_at_places_drawn_in_the_callers_scope():
    from xcit.data.views import DigitPlaces
    from xcit.seeding import rng_scope
    size = 32
    source = DigitPlaces('train', size=size, renders=2)
    moved = 0
    for i in range(30):
        with rng_scope(100 + i):
            draws = [np.asarray(d) for d in source.load(i)]
        with rng_scope(100 + i):
            again = [np.asarray(d) for d in source.load(i)]
        assert len(draws) == 2 and all(np.array_equal(a, b) for a, b in zip(draws, again))
        (place_1, block_1), (place_2, block_2) = (_digit_at(d, size) for d in draws)
        assert np.array_equal(block_1, block_2)  # one digit, drawn twice
        moved += place_1 != place_2
    assert moved >= 20  # independent places: the same one 1 time in 25


@pytest.mark.parametrize('size', [8, 20, 2048])
def test_digit_places_refuse_a_canvas_off_the_grid(size):
    from xcit.data.views import DigitPlaces
    with pytest.raises(ValueError, match=f'size must be a multiple of 8 from 16 to 1024 pixels, not {size}'):
        DigitPlaces('val', size=size)
