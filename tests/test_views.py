"""Views: exact round trips on odd, non-square shapes; albumentations as the oracle."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import albumentations as A
import numpy as np
import pytest
import torch

from kaggle_tta.config.errors import ConfigError
from kaggle_tta.ops.views import D4_ELEMENTS, PRESETS, View, parse_tta, register_op, view_from_name
from kaggle_tta.ops.views import functional as Fn
from kaggle_tta.ops.views.views import PARAMETRIC, CentreCrop, Colour, Crop, Op, Scale

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


@pytest.mark.parametrize("shape", [(300, 300), (300, 451), (451, 300)])
def test_five_and_ten_crop_match_the_reference_code(shape):
    """The reference document: SmallestMaxSize(256) then 224 crops at the corners and centre
    of the whole resized image, ten-crop adds each crop's horizontal flip. The loader cuts
    those crops (albumentations backend, crop_pct 0.875); each view starts from its own."""
    from kaggle_tta.io.canvas import POSITIONS, CanvasSpec

    rng = np.random.default_rng(2)
    img = rng.integers(0, 255, (*shape, 3), dtype=np.uint8)
    crops = CanvasSpec(
        (224, 224), 0.875, "bilinear", mode="crop", backend="albumentations", positions=POSITIONS
    ).build()(img)
    image_resized = A.SmallestMaxSize(max_size=256)(image=img)["image"]
    h, w = image_resized.shape[:2]
    c = 224
    boxes = [
        [0, 0, c, c],
        [w - c, 0, w, c],
        [0, h - c, c, h],
        [w - c, h - c, w, h],
        [(w - c) // 2, (h - c) // 2, (w + c) // 2, (h + c) // 2],
    ]
    ref = []
    for x_min, y_min, x_max, y_max in boxes:
        crop = A.Crop(x_min=x_min, y_min=y_min, x_max=x_max, y_max=y_max)(image=image_resized)["image"]
        ref.append(crop)
        ref.append(A.HorizontalFlip(p=1.0)(image=crop)["image"])
    at = {p: torch.from_numpy(crops[k]).permute(2, 0, 1)[None] for k, p in enumerate(POSITIONS)}
    ours = [
        v.bind(None, MEAN, STD).apply(at[v.position])[0].permute(1, 2, 0).numpy() for v in parse_tta("ten_crop", "t")
    ]
    assert len(ours) == 10
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kind,value",
    [
        ("brightness", 0.15),
        ("brightness", -0.2),
        ("contrast", 0.2),
        ("contrast", -0.3),
        ("gamma", 0.8),
        ("gamma", 1.25),
    ],
)
def test_colour_views_match_albumentations(kind, value):
    rng = np.random.default_rng(3)
    img = rng.uniform(0, 1, (5, 7, 3)).astype(np.float32)
    if kind == "gamma":
        t = A.RandomGamma(gamma_limit=(value * 100, value * 100), p=1.0)
    else:
        b, c = (value, 0.0) if kind == "brightness" else (0.0, value)
        t = A.RandomBrightnessContrast(brightness_limit=(b, b), contrast_limit=(c, c), p=1.0)
    ref = t(image=img)["image"]
    x = (torch.from_numpy(img).permute(2, 0, 1)[None] - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(
        1, 3, 1, 1
    )
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


# ---- ops own their names, validation and identity ---------------------------------------------


@pytest.mark.parametrize(
    "name,message",
    [
        ("scale_9", "'scale_9': scale factors must lie in [0.05, 8]"),
        ("scale_0.01", "'scale_0.01': scale factors must lie in [0.05, 8]"),
        ("gamma_0", "'gamma_0': gamma must be positive"),
        ("gamma_-1", "'gamma_-1': gamma must be positive"),
        ("gamma_nan", "'gamma_nan': gamma must be positive"),
        ("gamma_inf", "'gamma_inf': 'inf' is not a finite number"),
        ("brightness_1", "'brightness_1': brightness must lie in (-1, 1)"),
        ("brightness_-1", "'brightness_-1': brightness must lie in (-1, 1)"),
        ("contrast_1", "'contrast_1': contrast must lie in (-1, 1)"),
        ("contrast_-1.5", "'contrast_-1.5': contrast must lie in (-1, 1)"),
        ("brightness_x", "'brightness_x': 'x' is not a number"),
    ],
)
def test_each_op_validates_its_value(name, message):
    with pytest.raises(ConfigError) as e:
        parse_tta([name], "members.a.tta")
    assert str(e.value) == f"members.a.tta[0]: {message}"


@pytest.mark.parametrize("name", ["scale_1", "brightness_0", "contrast_0", "gamma_1", "scale_1+gamma_1.0"])
def test_the_identity_value_is_no_op(name):
    v = view_from_name(name)
    assert (v.name, v.ops) == ("identity", ())


def test_ops_validate_directly_and_register_each_prefix_once():
    with pytest.raises(ValueError, match=r"scale factors must lie in \[0.05, 8\]"):
        Scale.validate(9.0)
    Scale.validate(1.25)
    assert {"scale", "brightness", "contrast", "gamma"} <= set(PARAMETRIC)

    @dataclass(frozen=True)
    class Zoom(Scale):
        prefix = "zoom"
        keys = ("scales",)  # taken by Scale

    with pytest.raises(ValueError, match="'scales' already names Scale"):
        register_op(Zoom)
    assert "zoom" not in PARAMETRIC


@pytest.mark.parametrize(
    "spec,message",
    [
        (["gama_0.9"], "members.a.tta[0]: unknown view 'gama_0.9' — did you mean 'gamma_0.9'?"),
        (["scal_2"], "members.a.tta[0]: unknown view 'scal_2' — did you mean 'scale_1.25'?"),
        (["brightnes_0.2+hflip"], "members.a.tta[0]: unknown view 'brightnes_0.2' — did you mean 'brightness_0.1'?"),
        ("d5", "members.a.tta: unknown view 'd5' — did you mean 'd4'?; presets are none, hflip"),
        (["d5"], "members.a.tta[0]: unknown view 'd5' — did you mean 'd4'?"),
        ("ten_crops", "members.a.tta: unknown view 'ten_crops' — did you mean 'ten_crop'?"),
        ([{"scael": [1.25]}], "members.a.tta[0]: unknown view mapping 'scael' — did you mean 'scales'?"),
        ([{"prodcut": ["hflip"]}], "members.a.tta[0]: unknown view mapping 'prodcut' — did you mean 'product'?"),
    ],
)
def test_unknown_prefixes_presets_and_mappings_get_a_did_you_mean(spec, message):
    with pytest.raises(ConfigError) as e:
        parse_tta(spec, "members.a.tta")
    assert str(e.value).startswith(message)


@pytest.fixture
def invert_op():
    """A toy parametric op, registered for one test: nothing in presets.py names it."""

    @register_op
    @dataclass(frozen=True)
    class Invert(Colour):
        """Mixes [0, 1] pixels with their negative by ``value``."""

        prefix = "invert"
        keys = ("inverts",)
        identity = 0.0
        example = 0.5

        @classmethod
        def validate(cls, value: float) -> None:
            if not 0 <= value <= 1:
                raise ValueError("invert must lie in [0, 1]")

        def adjust(self, px):
            return px * (1 - self.value) + (1 - px) * self.value

    yield Invert
    del PARAMETRIC[Invert.prefix]


def test_a_registered_op_parses_from_names_and_mappings(invert_op):
    views = parse_tta(["invert_0.5", {"inverts": [0, 1]}, {"product": ["hflip", {"inverts": 0.25}]}], "m.tta")
    assert [v.name for v in views] == ["invert_0.5", "identity", "invert_1", "hflip+invert_0.25"]
    assert all(view_from_name(v.name).name == v.name for v in views)
    assert views[2].targets == {"label", "mask", "boxes"} and not views[2].is_spatial
    x = torch.rand(1, 3, 5, 7)
    out = view_from_name("invert_1").bind(None, (0.0,) * 3, (1.0,) * 3).apply(x)
    torch.testing.assert_close(out, 1 - x)
    with pytest.raises(ConfigError, match=r"'invert_2': invert must lie in \[0, 1\]"):
        parse_tta(["invert_2"], "m.tta")
    with pytest.raises(ConfigError, match="did you mean 'invert_0.5'"):
        parse_tta(["invrt_0.3"], "m.tta")
    with pytest.raises(ConfigError, match="did you mean 'inverts'"):
        parse_tta([{"invert": [0.3]}], "m.tta")


# ---- crops are ordinary ops ---------------------------------------------------------------------


def test_crop_is_the_first_op_of_a_bound_chain():
    assert isinstance(_bound("crop_tl+hflip", (3, 4)).ops[0], Crop)
    assert _bound("crop_tl+hflip", (3, 4)).ops[0].size == (3, 4)
    assert isinstance(_bound("identity", (3, 4)).ops[0], CentreCrop)
    assert isinstance(_bound("hflip", (3, 4)).ops[0], CentreCrop)
    # Bound to None (segmentation): the whole canvas, so no crop to add.
    assert view_from_name("hflip").bind(None, MEAN, STD).ops == view_from_name("hflip").ops
    assert view_from_name("crop_tl+hflip").name == "crop_tl+hflip"


def test_identity_is_a_centre_crop_to_the_input_size_or_nothing():
    x = torch.randn(2, 3, 7, 9)
    v = _bound("identity", (3, 5))
    assert v.out_size((7, 9)) == (3, 5)
    assert torch.equal(v.apply(x), x[..., 2:5, 2:7])
    assert not v.is_spatial and v.targets == {"label", "mask", "boxes"}
    assert view_from_name("identity").bind(None, MEAN, STD).apply(x) is x


def test_crop_inverses_take_the_input_size():
    m = torch.randn(1, 2, 3, 4)
    b = np.array([[0.1, 0.2, 0.5, 0.6]])
    for crop in (Crop("tl", (3, 4)), Crop("br", None), CentreCrop(size=(3, 4))):
        assert crop.invert_mask(m, (3, 4)) is m  # the crop was the whole canvas
        back = crop.invert_boxes(b, (3, 4))
        assert back is not b and np.array_equal(back, b)
    with pytest.raises(NotImplementedError, match="maps only through tiling"):
        Crop("tl", (3, 4)).invert_mask(m, (5, 7))
    with pytest.raises(NotImplementedError, match="boxes only through tiling"):
        Crop("tl", (3, 4)).invert_boxes(b, (5, 7))
    # Through the view: on a canvas equal to the input size the crop is exact.
    np.testing.assert_allclose(_bound("crop_tr+hflip", (5, 7)).invert_boxes(Fn.boxes_hflip(b), (5, 7)), b, atol=1e-15)


@pytest.mark.parametrize(
    "name", ["crop_bl+rot90+scale_0.6", "transverse+gamma_0.8+scale_1.3", "contrast_0.2+brightness_0.1"]
)
def test_every_op_inverts_boxes_and_masks_with_the_same_signature(name):
    v = _bound(name, (5, 7))
    sizes = v._sizes((5, 7))
    for op, size in zip(v.ops, sizes):
        assert op.invert_boxes(np.zeros((0, 4)), size).shape == (0, 4)
        assert tuple(op.invert_mask(op.apply(torch.zeros(1, 1, *size)), size).shape[-2:]) == tuple(size)


def test_hint_comes_from_the_op_that_blocks_the_target():
    assert (
        _bound("crop_tl+hflip").hint("mask") == "crops are legal for maps only through tiling (members.<name>.tiling)"
    )
    assert _bound("crop_tl").hint("boxes") == Crop.hint
    assert _bound("crop_tl").hint("label") == ""
    assert _bound("hflip+scale_1.25").hint("mask") == ""

    @dataclass(frozen=True)
    class LabelsOnly(Op):
        name = "labels_only"
        targets = frozenset({"label"})

    v = View("hflip+labels_only", (*view_from_name("hflip").ops, LabelsOnly()))
    assert v.targets == {"label"}
    assert v.hint("mask") == "drop it from the list"


def test_parsing_views_imports_no_torch():
    code = (
        "import sys, kaggle_tta.ops.views as v; v.parse_tta('ten_crop', 't'); "
        "v.parse_tta(['rot90', {'scales': [1.25]}, 'crop_tl+gamma_0.9'], 't'); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
