"""Fidelity: every view sees exactly the pixels the model was validated on.

Oracles: timm's own eval transform (``timm.data.create_transform(..., is_training=False)``
on a PIL image, as timm validates), and the reference document's five-crop code
(``A.SmallestMaxSize`` then crop boxes of the whole resized image). Images are non-square,
with odd and even differences, and textured like camera photos (not smooth scenes)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from kaggle_tta.io.canvas import POSITIONS, CanvasSpec
from kaggle_tta.io.data import decode_image


def _camera_like(h: int, w: int, seed: int) -> np.ndarray:
    """Texture at every scale (noise, fine stripes, edges, a gradient): what antialiasing
    and off-by-one crops change the most."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([127 + 100 * np.sin(xx / (1.3 + c) + yy / (2.1 + c)) for c in range(3)], -1)
    img += rng.normal(0, 25, (h, w, 3)) + (xx / w * 60)[..., None]
    img[(xx // 7 + yy // 5) % 2 == 0] += 40
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(img: np.ndarray, path) -> None:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    path.write_bytes(buf.tobytes())


def _timm_oracle(path, size: tuple[int, int], crop_pct: float, interpolation: str) -> np.ndarray:
    """timm's eval transform on the image as timm loads it, in uint8 (mean 0, std 1)."""
    from timm.data import create_transform

    t = create_transform(
        input_size=(3, *size),
        crop_pct=crop_pct,
        interpolation=interpolation,
        mean=(0, 0, 0),
        std=(1, 1, 1),
        is_training=False,
    )
    x = t(Image.open(path).convert("RGB"))
    return np.clip(np.round(x.permute(1, 2, 0).numpy() * 255.0), 0, 255).astype(np.uint8)


SHAPES = [(683, 1024), (768, 1023), (501, 333), (640, 480)]  # odd and even differences, both orientations


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "size,crop_pct,interpolation",
    [
        ((224, 224), 0.95, "bicubic"),
        ((224, 224), 0.875, "bilinear"),
        ((224, 224), 1.0, "bicubic"),
        ((192, 160), 0.9, "bilinear"),
    ],
)
def test_timm_backend_is_timms_eval_transform(tmp_path, shape, size, crop_pct, interpolation):
    path = tmp_path / "photo.jpg"
    _jpeg(_camera_like(*shape, seed=shape[0]), path)
    spec = CanvasSpec(size, crop_pct, interpolation, mode="crop", backend="timm", positions=("center",))
    ours = spec.build()(decode_image(path))[0]
    oracle = _timm_oracle(path, size, crop_pct, interpolation)
    assert ours.shape == oracle.shape
    diff = np.abs(ours.astype(int) - oracle.astype(int))
    # the JPEG decoders (OpenCV's, PIL's) may differ by one level on a few pixels
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.999, (diff.max(), (diff == 0).mean())


@pytest.mark.parametrize("shape", SHAPES)
def test_timm_backend_is_exact_on_a_lossless_image(tmp_path, shape):
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), cv2.cvtColor(_camera_like(*shape, seed=1), cv2.COLOR_RGB2BGR))
    ours = CanvasSpec((224, 224), 0.95, "bicubic", mode="crop", backend="timm").build()(decode_image(path))[0]
    np.testing.assert_array_equal(ours, _timm_oracle(path, (224, 224), 0.95, "bicubic"))


def test_the_centre_is_not_one_pixel_off_where_both_halvings_are_odd(tmp_path):
    """683x1024 at 224 / 0.95: timm crops the 235 x 352 resize at (6, 64) (round half to
    even); floor-halving twice (through a 235 x 235 canvas) gave (5, 63)."""
    img = _camera_like(683, 1024, seed=5)
    resized = np.asarray(Image.fromarray(img).resize((352, 235), Image.BICUBIC))
    assert resized.shape[:2] == (235, 352)
    ours = CanvasSpec((224, 224), 0.95, "bicubic", mode="crop", backend="timm").build()(img)[0]
    np.testing.assert_array_equal(ours, resized[6 : 6 + 224, 64 : 64 + 224])


def _reference_five_crop(image: np.ndarray, max_size: int, crop: int) -> list[np.ndarray]:
    """The reference document's five_crop_tta boxes, on its SmallestMaxSize resize."""
    import albumentations as A

    r = A.SmallestMaxSize(max_size=max_size)(image=image)["image"]
    h, w = r.shape[:2]
    boxes = {
        "tl": [0, 0, crop, crop],
        "tr": [w - crop, 0, w, crop],
        "bl": [0, h - crop, crop, h],
        "br": [w - crop, h - crop, w, h],
        "center": [(w - crop) // 2, (h - crop) // 2, (w + crop) // 2, (h + crop) // 2],
    }
    return [
        A.Crop(x_min=b[0], y_min=b[1], x_max=b[2], y_max=b[3])(image=r)["image"] for b in (boxes[p] for p in POSITIONS)
    ]


@pytest.mark.parametrize("shape", SHAPES + [(256, 256)])
@pytest.mark.parametrize("crop_pct", [0.875, 0.95, 1.0])
def test_albumentations_backend_five_crop_is_the_reference_code(shape, crop_pct):
    img = _camera_like(*shape, seed=2)
    max_size = int(np.floor(224 / crop_pct))
    ours = CanvasSpec(
        (224, 224), crop_pct, "bilinear", mode="crop", backend="albumentations", positions=POSITIONS
    ).build()(img)
    for k, ref in enumerate(_reference_five_crop(img, max_size, 224)):
        np.testing.assert_array_equal(ours[k], ref, err_msg=POSITIONS[k])


def test_corners_come_from_the_whole_resized_image():
    """683x1024 at 224 / 0.875 resizes to 256 x 384: the corners sit at x = 0 and 160."""
    img = _camera_like(683, 1024, seed=3)
    ours = CanvasSpec(
        (224, 224), 0.875, "bilinear", mode="crop", backend="albumentations", positions=("tl", "tr")
    ).build()(img)
    import albumentations as A

    r = A.SmallestMaxSize(max_size=256)(image=img)["image"]
    assert r.shape[:2] == (256, 384)
    np.testing.assert_array_equal(ours[0], r[:224, :224])
    np.testing.assert_array_equal(ours[1], r[:224, 160:])


def test_every_view_of_a_run_starts_from_the_oracle_crop(tmp_path, pipeline):
    """Through the engine: a model whose logits are its input's top-left pixels shows which
    pixels each view got; crop_br's and identity's match timm's resize and crop boxes."""
    from kaggle_tta import infer

    write, cfg = pipeline
    images = tmp_path / "photos"
    images.mkdir()
    for k, shape in enumerate([(91, 130), (130, 91)]):
        cv2.imwrite(str(images / f"p{k}.png"), cv2.cvtColor(_camera_like(*shape, seed=k), cv2.COLOR_RGB2BGR))
    cfg["data"] = {"folder": str(images), "classes": ["r", "g", "b", "x"]}
    mean, std = [0.5] * 3, [0.25] * 3
    cfg["members"] = [
        {
            "name": "px",
            "factory": "helpers:top_left_pixels",
            "preprocess": {
                "input_size": [3, 56, 56],
                "crop_pct": 0.9,
                "interpolation": "bicubic",
                "mean": mean,
                "std": std,
                "backend": "timm",
            },
            "tta": ["identity", "crop_br"],
        }
    ]
    cfg["blends"] = []
    infer(write(cfg), progress=False)
    entry = next((tmp_path / "cache" / "px").iterdir())
    for view, position in (("identity", "center"), ("crop_br", "br")):
        got = np.load(entry / f"{view}.npy")
        for k in range(2):
            img = decode_image(images / f"p{k}.png")
            crop = CanvasSpec((56, 56), 0.9, "bicubic", mode="crop", backend="timm", positions=(position,)).build()(
                img
            )[0]
            want = (crop[0, :2, 0].astype(np.float32) / 255.0 - 0.5) / 0.25  # channel 0, pixels (0, 0) and (0, 1)
            np.testing.assert_allclose(got[k, :2], want, atol=1e-5)


# ---- every member's activation is honoured ----------------------------------------------------


def _views_mean(entry, views) -> np.ndarray:
    return np.mean([np.load(entry / f"{v}.npy") for v in views], axis=0)


def _softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize("activation,fn", [("sigmoid", _sigmoid), ("none", lambda x: x), ("softmax", _softmax)])
def test_a_members_activation_is_honoured_after_a_mean_of_logits(pipeline, tmp_path, activation, fn):
    import polars as pl

    from kaggle_tta import run

    write, cfg = pipeline
    cfg["members"] = [dict(cfg["members"][0], activation=activation, merge="mean")]
    cfg["blends"] = []
    cfg["submission"].update(format="probs")
    result = run(write(cfg), progress=False)
    entry = next((tmp_path / "cache" / "a").iterdir())
    want = fn(_views_mean(entry, ["identity", "hflip"]))
    got = pl.read_csv(result.blend.path).drop("id").to_numpy()
    np.testing.assert_allclose(got, want, atol=2e-6)  # the CSV keeps 6 decimals


def test_a_blend_of_members_with_their_own_activations(pipeline, tmp_path):
    import polars as pl

    from kaggle_tta import run

    write, cfg = pipeline
    cfg["members"][0].update(activation="sigmoid", merge="mean")
    cfg["members"][1].update(activation="softmax", merge="mean")
    cfg["blends"] = [{"name": "ens", "inputs": ["a", "b"], "method": "mean", "weights": [1, 3]}]
    cfg["submission"].update(format="probs")
    result = run(write(cfg), progress=False)
    ea, eb = (next((tmp_path / "cache" / n).iterdir()) for n in ("a", "b"))
    want = 0.25 * _sigmoid(_views_mean(ea, ["identity", "hflip"])) + 0.75 * _softmax(
        _views_mean(eb, ["identity", "rot90", "rot180", "rot270", "vflip", "transverse", "hflip", "transpose"])
    )
    np.testing.assert_allclose(pl.read_csv(result.blend.path).drop("id").to_numpy(), want, atol=2e-6)


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda c: c["members"][1].update(merge="mean_prob"),
            r"blends\[0\]\.space: logits needs every input to give logits, but 'b' gives probs",
        ),
        (
            lambda c: c["members"][0].update(activation="sigmoid"),
            r"blends\[0\]\.space: logits of different activations",
        ),
        (
            lambda c: c["blends"][0].update(method="power_mean"),
            r"blends\[0\]\.space: power_mean combines probabilities",
        ),
    ],
)
def test_a_blend_space_that_cannot_hold_is_an_error_at_load(pipeline, change, message):
    from kaggle_tta import build_plan, load_pipeline
    from kaggle_tta.config.errors import ConfigError

    write, cfg = pipeline
    cfg["blends"][0]["space"] = "logits"
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        build_plan(load_pipeline(write(cfg)))


def test_rank_mean_ranks_each_members_probabilities(pipeline, tmp_path):
    from kaggle_tta import run
    from kaggle_tta.ops.merge import rank_columns

    write, cfg = pipeline
    cfg["members"][0]["merge"] = "mean"  # logits: ranked through softmax, not raw
    cfg["members"][1]["merge"] = "mean_prob"
    cfg["blends"] = [{"name": "ens", "inputs": ["a", "b"], "method": "rank_mean"}]
    cfg["submission"].update(format="probs")
    result = run(write(cfg), progress=False)
    ea, eb = (next((tmp_path / "cache" / n).iterdir()) for n in ("a", "b"))
    pa = _softmax(_views_mean(ea, ["identity", "hflip"]))
    pb = np.mean([_softmax(np.load(f)) for f in sorted(eb.glob("*.npy"))], axis=0)
    want = 0.5 * rank_columns(pa.astype(np.float32)) + 0.5 * rank_columns(pb.astype(np.float32))
    np.testing.assert_allclose(result.blend.table.drop("id").to_numpy(), want, atol=1e-6)
