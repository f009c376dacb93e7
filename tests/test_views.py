"""Views: exact round trips on odd, non-square shapes; albumentations as the oracle."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch

from kaggle_tta.errors import ConfigError
from kaggle_tta.views import D4_ELEMENTS, PRESETS, parse_tta, view_from_name
from kaggle_tta.views import functional as Fn

SHAPE = (1, 3, 5, 7)  # odd and non-square on purpose
PERMUTATIONS = ["identity", "hflip", "vflip", "rot90", "rot180", "rot270", "transpose", "transverse"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _bound(name: str, size=(5, 7)):
    return view_from_name(name).bind(size, MEAN, STD)


@pytest.mark.parametrize("name", PERMUTATIONS + ["hflip+rot90", "transpose+vflip+rot270"])
def test_permutation_round_trip_is_bit_exact_on_masks(name):
    x = torch.randn(SHAPE)
    v = _bound(name)
    y = v.apply(x)
    assert y.shape[-2:] == v.out_size((5, 7))
    assert torch.equal(v.invert_mask(y, (5, 7)), x)


@pytest.mark.parametrize("name", PERMUTATIONS + ["hflip+rot90", "scale_0.75", "scale_1.3+hflip", "brightness_0.1"])
def test_box_round_trip(name):
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 0.5, (6, 2))
    boxes = np.concatenate([a, a + rng.uniform(0.05, 0.5, (6, 2))], axis=1)
    v = _bound(name)
    # Forward map of boxes, built from the image ops: a box drawn as a mask, moved by the view.
    for b in boxes[:2]:
        m = torch.zeros(1, 1, 50, 70)
        x1, y1, x2, y2 = (b * [70, 50, 70, 50]).round().astype(int)
        m[..., y1:y2, x1:x2] = 1
        vb = _bound(name, (50, 70))
        out = vb.apply(m)
        ys, xs = torch.nonzero(out[0, 0] > 0.5, as_tuple=True)
        h, w = out.shape[-2:]
        moved = np.array([[xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h]], dtype=np.float64)
        back = vb.invert_boxes(moved, (50, 70))
        np.testing.assert_allclose(back[0], [x1 / 70, y1 / 50, x2 / 70, y2 / 50], atol=2.5 / 50)
    assert v.invert_boxes(np.zeros((0, 4)), (5, 7)).shape == (0, 4)


@pytest.mark.parametrize("factor", [0.5, 0.75, 1.25, 2.0])
def test_scale_inverts_by_recorded_shape(factor):
    x = torch.randn(1, 3, 225, 101)  # 225 * 0.75 = 168.75 -> 169; 169 / 0.75 is not 225
    v = _bound(f"scale_{factor}", (225, 101))
    y = v.apply(x)
    assert tuple(y.shape[-2:]) == Fn.scaled_size((225, 101), factor)
    assert v.invert_mask(y, (225, 101)).shape == x.shape
    # A constant map survives any resize exactly; a smooth one up to interpolation error.
    const = torch.full((1, 2, 225, 101), 0.3)
    torch.testing.assert_close(v.invert_mask(v.apply(const), (225, 101)), const, atol=1e-6, rtol=0)
    ramp = torch.linspace(0, 1, 101).view(1, 1, 1, -1).expand(1, 1, 225, 101).contiguous()
    err = (v.invert_mask(v.apply(ramp), (225, 101)) - ramp).abs()[..., 3:-3].max()
    assert err < 0.02


def test_colour_views_invert_to_identity_and_compose():
    m = torch.randn(1, 2, 5, 7)
    assert torch.equal(_bound("gamma_0.8").invert_mask(m, (5, 7)), m)
    v = _bound("gamma_0.8+hflip")
    assert v.targets == {"label", "mask", "boxes"}
    assert torch.equal(v.invert_mask(m.flip(-1), (5, 7)), m)


def test_crop_views_declare_labels_only():
    assert _bound("crop_tl").targets == {"label"}
    assert _bound("identity").targets == {"label", "mask", "boxes"}


@pytest.mark.parametrize("code,name", list(D4_ELEMENTS.items()))
def test_d4_matches_albumentations_element_for_element(code, name):
    from albumentations.augmentations.geometric import functional as fgeom

    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (5, 7, 3), dtype=np.uint8)
    mask = rng.integers(0, 4, (5, 7), dtype=np.uint8)
    ours = _bound(name).apply(torch.from_numpy(img).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(ours, fgeom.d4(img, code))
    ours_m = _bound(name).apply(torch.from_numpy(mask)[None, None])[0, 0].numpy()
    np.testing.assert_array_equal(ours_m, fgeom.d4(mask, code))
    # Boxes: albumentations' own D4 on normalized albumentations-format boxes.
    boxes = np.array([[0.1, 0.2, 0.4, 0.9], [0.5, 0.05, 0.95, 0.3]])
    theirs = fgeom.bboxes_d4(boxes, code)
    # Our inverse maps the transformed boxes back; the forward of the inverse must match.
    back = _bound(name).invert_boxes(theirs, (5, 7))
    np.testing.assert_allclose(back, boxes, atol=1e-12)


def test_d4_preset_is_albumentations_order():
    assert [v.name for v in parse_tta("d4", "t")] == list(D4_ELEMENTS.values())
    assert len(PRESETS["d4"]) == 8


def test_five_and_ten_crop_match_the_reference_code():
    """The reference document: SmallestMaxSize(256) then 224 crops at the corners and centre,
    ten-crop adds each crop's horizontal flip. Our canvas (crop_pct 0.875) is that resize."""
    from kaggle_tta.data import CanvasSpec

    rng = np.random.default_rng(2)
    img = rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)
    spec = CanvasSpec((224, 224), 0.875, "bilinear")
    canvas = spec.build()(image=img)["image"]
    image_resized = A.SmallestMaxSize(max_size=256)(image=img)["image"]
    np.testing.assert_array_equal(canvas, image_resized)
    h, w = image_resized.shape[:2]
    c = 224
    boxes = [[0, 0, c, c], [w - c, 0, w, c], [0, h - c, c, h], [w - c, h - c, w, h], [(w - c) // 2, (h - c) // 2, (w + c) // 2, (h + c) // 2]]
    ref = []
    for x_min, y_min, x_max, y_max in boxes:
        crop = A.Crop(x_min=x_min, y_min=y_min, x_max=x_max, y_max=y_max)(image=image_resized)["image"]
        ref.append(crop)
        ref.append(A.HorizontalFlip(p=1.0)(image=crop)["image"])
    t = torch.from_numpy(canvas).permute(2, 0, 1)[None]
    ours = [v.bind((224, 224), MEAN, STD).apply(t)[0].permute(1, 2, 0).numpy() for v in parse_tta("ten_crop", "t")]
    assert len(ours) == 10
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind,value", [("brightness", 0.15), ("brightness", -0.2), ("contrast", 0.2), ("contrast", -0.3), ("gamma", 0.8), ("gamma", 1.25)])
def test_colour_views_match_albumentations(kind, value):
    rng = np.random.default_rng(3)
    img = rng.uniform(0, 1, (5, 7, 3)).astype(np.float32)
    if kind == "gamma":
        t = A.RandomGamma(gamma_limit=(value * 100, value * 100), p=1.0)
    else:
        b, c = (value, 0.0) if kind == "brightness" else (0.0, value)
        t = A.RandomBrightnessContrast(brightness_limit=(b, b), contrast_limit=(c, c), p=1.0)
    ref = t(image=img)["image"]
    x = (torch.from_numpy(img).permute(2, 0, 1)[None] - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    out = _bound(f"{kind}_{value}").apply(x)
    px = (out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1))[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(px, ref, atol=1e-5)


def test_products_and_names_parse_back():
    views = parse_tta([{"product": [["identity", "hflip"], {"scales": [1.0, 1.25]}]}], "m.tta")
    assert [v.name for v in views] == ["identity", "scale_1.25", "hflip", "hflip+scale_1.25"]
    for v in views + parse_tta("ten_crop", "m.tta"):
        assert view_from_name(v.name).name == v.name


@pytest.mark.parametrize(
    "spec,message",
    [
        (["hfilp"], "members.a.tta[0]: unknown view 'hfilp' — did you mean 'hflip'?"),
        (["hflip", "hflip"], "view 'hflip' is listed twice"),
        ("d8", "unknown view 'd8'"),
        (["hflip+crop_tl"], "a crop must come first"),
        ([{"scales": ["big"]}], "could not convert"),
        ([{"zoom": 2}], "unknown view mapping 'zoom'"),
    ],
)
def test_bad_views_are_named(spec, message):
    with pytest.raises(ConfigError) as e:
        parse_tta(spec, "members.a.tta")
    assert message in str(e.value)
