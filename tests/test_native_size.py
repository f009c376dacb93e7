"""Segmentation at each image's own size (segmentation.size: native): TIFF windows equal the
whole image, maps stitched band by band and encoded band by band equal what a whole-image
pass writes, images of any size in one run, and memory bounded by the tiles, not the image."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from kaggle_tta.cli import main
from kaggle_tta.config.data import ReaderConfig
from kaggle_tta.ops.rle import RunWriter, mask_to_rle, rle_to_mask
from kaggle_tta.tasks.seg_native import band_probs

tifffile = pytest.importorskip("tifffile")

TESTS = Path(__file__).resolve().parent
CLASSES = ["r", "g", "b", "never"]


def _scene(h: int, w: int, seed: int) -> np.ndarray:
    """uint8 RGB blocks, each pixel bright (230) in at most one channel, else dark (25): the
    per-pixel model (helpers.BrightPixels, std 0.5) labels it with certainty."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 4, size=(h // 5 + 1, w // 7 + 1))
    lab = np.kron(cells, np.ones((5, 7), np.int64))[:h, :w]
    img = np.full((h, w, 3), 25, np.uint8)
    for c in range(3):
        img[..., c][lab == c + 1] = 230
    return img


def _truth(img: np.ndarray) -> list[np.ndarray]:
    return [img[..., c] > 128 for c in range(3)] + [np.zeros(img.shape[:2], bool)]


@pytest.mark.parametrize(
    "write",
    [
        {"tile": (32, 48), "compression": "zlib"},
        {"tile": (16, 32), "compression": "zlib", "planarconfig": "separate"},
        {"rowsperstrip": 7, "compression": "zlib"},
        {},  # uncompressed: memory-mapped
        {"pages": True},  # one 2-D page per channel, as HuBMAP's [1, 1, 3, H, W]
    ],
)
def test_tiff_windows_equal_the_whole_image(tmp_path, write):
    from kaggle_tta.io.windows import WindowSource, item_size

    img = _scene(101, 143, 1)
    path = tmp_path / "a.tif"
    if write.pop("pages", False):
        tifffile.imwrite(path, np.moveaxis(img, -1, 0)[None, None], photometric="minisblack")
    elif write.get("planarconfig") == "separate":
        tifffile.imwrite(path, np.moveaxis(img, -1, 0), **write)
    else:
        tifffile.imwrite(path, img, **write)
    assert item_size(str(path), None) == (101, 143)
    with WindowSource(str(path), None) as src:
        for top, left, h, w in [(0, 0, 101, 143), (13, 29, 40, 77), (100, 142, 1, 1), (31, 47, 2, 2)]:
            np.testing.assert_array_equal(src.read(top, left, h, w), img[top : top + h, left : left + w])


def test_a_16_bit_tiff_window_equals_numpy(tmp_path):
    from kaggle_tta.io.windows import WindowSource

    a = np.random.default_rng(2).integers(0, 65536, (77, 91), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", a, tile=(16, 32), compression="zlib")
    spec = ReaderConfig(name="image", window={"mode": "fixed", "range": [1000, 60000]}, gray="keep")
    with WindowSource(str(tmp_path / "a.tif"), spec) as src:
        got = src.read(5, 9, 50, 70)
    want = np.clip((a[5:55, 9:79].astype(np.float32) - 1000) / 59000, 0, 1)
    np.testing.assert_allclose(got[..., 0], want, atol=1e-6)


@pytest.mark.parametrize("window", [None, {"mode": "fixed", "range": [1000, 60000]}])
def test_an_item_of_several_tiffs_is_read_by_windows(tmp_path, monkeypatch, window):
    """Vesuvius: a fragment's layers 00.tif ... as channels. Each layer is read by windows, as
    one TIFF is (tiled, striped, memory-mapped), never whole: the windows equal the whole
    item's (readers.read_item); layers of two sizes are one line."""
    from kaggle_tta.io import readers, windows
    from kaggle_tta.io.windows import WindowSource, item_size

    rng = np.random.default_rng(4)
    layers = [rng.integers(0, 65536, (61, 83), dtype=np.uint16) for _ in range(3)]
    frag = tmp_path / "a" / "surface_volume"
    frag.mkdir(parents=True)
    for k, (a, kw) in enumerate(zip(layers, [{"tile": (16, 32), "compression": "zlib"}, {"rowsperstrip": 9}, {}])):
        tifffile.imwrite(frag / f"{k:02d}.tif", a, **kw)
    spec = ReaderConfig(name="image", channels=["{00..02}.tif"], window=window)  # a range, as the shell writes it
    assert spec.channels == ["00.tif", "01.tif", "02.tif"]
    with pytest.raises(ValueError, match="the range {3..1} runs backwards"):
        ReaderConfig(channels=["{3..1}.tif"])
    whole = readers.read_item(str(frag / "00.tif"), spec)
    assert whole.shape == (61, 83, 3)

    def refused(*a, **k):
        raise AssertionError("read whole")

    monkeypatch.setattr(windows, "_whole", refused)
    assert item_size(str(frag / "00.tif"), spec) == (61, 83)
    with WindowSource(str(frag / "00.tif"), spec) as src:
        for top, left, h, w in [(0, 0, 61, 83), (13, 29, 40, 50), (60, 82, 1, 1)]:
            np.testing.assert_array_equal(src.read(top, left, h, w), whole[top : top + h, left : left + w])
    tifffile.imwrite(frag / "01.tif", layers[1][:60])
    with pytest.raises(windows.DataError, match="60x83 where .*00.tif is 61x83; the files of one item must have"):
        WindowSource(str(frag / "00.tif"), spec)


def test_band_probs_equal_one_cv2_resize():
    rng = np.random.default_rng(0)
    for k, h, w, big_h, big_w in [(3, 7, 9, 37, 53), (2, 50, 40, 50, 40), (5, 30, 20, 10, 45)]:
        p = rng.random((k, h, w)).astype(np.float32)
        want = cv2.resize(np.moveaxis(p, 0, -1), (big_w, big_h), interpolation=cv2.INTER_LINEAR).reshape(
            big_h, big_w, k
        )
        for column in (True, False):
            n = big_w if column else big_h

            def read(a, b, column=column, p=p):
                return p[:, :, a:b] if column else p[:, a:b]

            parts = [band_probs(read, (h, w), (big_h, big_w), (a, min(a + 8, n)), column) for a in range(0, n, 8)]
            np.testing.assert_allclose(np.concatenate(parts, axis=1 if column else 0), want, atol=1e-6)


def test_runs_joined_across_chunks_equal_one_encoding():
    rng = np.random.default_rng(3)
    for _ in range(200):
        m = rng.random(tuple(rng.integers(1, 30, 2))) < rng.random()
        for order in "FC":
            flat = m.ravel(order=order)
            cuts = sorted(rng.integers(0, flat.size + 1, 3).tolist())
            writer = RunWriter(one_indexed=True)
            for a, b in zip([0, *cuts], [*cuts, flat.size]):
                writer.add(flat[a:b])
            assert writer.text("-") == mask_to_rle(m, order, True, "-")


def _pipeline(tmp_path: Path, **over: object) -> Path:
    cfg = {
        "task": "segmentation",
        "data": {"folder": str(tmp_path / "test"), "classes": CLASSES},
        "runtime": {"device": "cpu", "precision": "fp32", "workers": 0, "batch_size": 3, "forward_batch": 16},
        "cache": {"dir": str(tmp_path / "cache")},
        "segmentation": {"size": "native"},
        "members": [
            {
                "name": "m",
                "factory": "helpers:bright_pixels",
                "preprocess": {"mean": [0.0] * 3, "std": [0.5] * 3},
                "tiling": {"tile": [16, 24], "overlap": 0.3, "weight": "gaussian"},
                "tta": "d4",
            }
        ],
        "submission": {
            "path": str(tmp_path / "sub.csv"),
            "format": "rle",
            "rle": {"order": "column", "rows": "image_class", "id_template": "{id}_{class}"},
        },
    }
    for key, value in over.items():
        section, _, name = key.partition("__")
        cfg[section] = {**cfg[section], name: value} if name else value  # type: ignore[dict-item]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rows(path: Path) -> dict[str, str]:
    csv.field_size_limit(1 << 30)  # a large image's RLE
    with open(path, newline="") as f:
        return {r["id"]: r["EncodedPixels"] for r in csv.DictReader(f)}


def _images(tmp_path: Path) -> dict[str, np.ndarray]:
    """PNGs and tiled TIFFs, each of its own odd size."""
    (tmp_path / "test").mkdir()
    images = {}
    for k, (h, w) in enumerate([(37, 53), (64, 41), (23, 90), (71, 71), (19, 17)]):
        img = _scene(h, w, k)
        images[f"s{k}"] = img
        if k % 2:
            tifffile.imwrite(tmp_path / "test" / f"s{k}.tif", img, tile=(16, 16), compression="zlib")
        else:
            cv2.imwrite(str(tmp_path / "test" / f"s{k}.png"), img[:, :, ::-1])
    return images


@pytest.mark.parametrize("order", ["column", "row"])
def test_images_of_any_size_are_segmented_exactly(tmp_path, monkeypatch, order):
    monkeypatch.syspath_prepend(str(TESTS))
    images = _images(tmp_path)
    rle = {"order": order, "rows": "image_class", "id_template": "{id}_{class}"}
    path = _pipeline(tmp_path, submission__rle=rle)
    assert main(["run", str(path), "-q"]) == 0
    rows = _rows(tmp_path / "sub.csv")
    assert len(rows) == len(images) * len(CLASSES)
    for name, img in images.items():
        for c, mask in zip(CLASSES, _truth(img)):
            assert rows[f"{name}_{c}"] == mask_to_rle(mask, "F" if order == "column" else "C", True, ""), (name, c)


def test_native_equals_the_shared_canvas_where_images_share_a_size(tmp_path, monkeypatch):
    """Images of one size: native (band by band, window by window) writes what the whole-canvas
    path writes, at a reduced cache resolution too."""
    monkeypatch.syspath_prepend(str(TESTS))
    (tmp_path / "test").mkdir()
    for k in range(4):
        cv2.imwrite(str(tmp_path / "test" / f"s{k}.png"), _scene(45, 62, 10 + k))
    out = {}
    for size, scale in [("native", 1.0), (None, 1.0), ("native", 0.5), (None, 0.5)]:
        cache = {"dir": str(tmp_path / "cache"), "scale": scale}
        path = _pipeline(tmp_path, segmentation={"size": size}, cache=cache)
        assert main(["run", str(path), "-q"]) == 0
        out[size, scale] = _rows(tmp_path / "sub.csv")
    assert out["native", 1.0] == out[None, 1.0]
    # At half resolution native scales each tile before stitching, the canvas path after: they
    # differ on pixels at class borders, each about as right as the other against the truth.
    right = {}
    for size in ("native", None):
        hits = [
            (rle_to_mask(out[size, 0.5][f"s{k}_{c}"], (45, 62), "F", True, "") == mask).mean()
            for k in range(4)
            for c, mask in zip(CLASSES, _truth(cv2.imread(str(tmp_path / "test" / f"s{k}.png"))[:, :, ::-1]))
        ]
        right[size] = float(np.mean(hits))
    assert right["native"] > 0.9 and right["native"] > right[None] - 0.01, right


def test_what_native_size_cannot_do_is_one_line_at_load(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(TESTS))
    _images(tmp_path)
    path = _pipeline(tmp_path, segmentation={"size": "native", "min_area": 5})
    assert main(["run", str(path), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "segmentation.min_area" in err[0] and "native" in err[0]
    assert not list((tmp_path / "cache").rglob("*.npy*"))  # before any forward


def _checkerboard(path: Path, n: int, t: int = 512) -> None:
    """An n x n RGB tiled TIFF written tile by tile: red where (y // 700 + x // 900) is odd."""

    def tiles():
        for ty in range(0, n, t):
            for tx in range(0, n, t):
                yy, xx = np.mgrid[ty : ty + t, tx : tx + t]
                tile = np.full((t, t, 3), 25, np.uint8)
                tile[..., 0][((yy // 700 + xx // 900) % 2) == 1] = 230
                yield tile

    tifffile.imwrite(path, tiles(), shape=(n, n, 3), dtype=np.uint8, tile=(t, t), compression="zlib", photometric="rgb")


def test_a_large_tiff_costs_the_tiles_not_the_image(tmp_path):
    """A 4096 x 4096 RGB TIFF (50 MB as uint8, 200 MB as the float32 input a whole-image pass
    would hold) segmented with 512-pixel tiles: the whole run's peak RSS is within 120 MB of
    the same run's on a 1024 x 1024 image (two tiles in flight on both; what grows is the cached
    map at a quarter of the side, 5 MB a view, and the blend's bands, columns at full height;
    measured on the 2-core EPYC: 706 and 750 MB).
    The 20 000 x 20 000 figure is make bench's (docs/benchmarks.md)."""
    peaks = {}
    for n in (1024, 4096):
        root = tmp_path / str(n)
        (root / "test").mkdir(parents=True)
        _checkerboard(root / "test" / "slide.tif", n)
        cfg = yaml.safe_load(_pipeline(root).read_text())
        cfg["data"]["folder"] = str(root / "test")
        cfg["cache"] = {"dir": str(root / "cache"), "dtype": "uint8", "scale": 0.25}
        cfg["members"][0]["tiling"] = {"tile": 512, "overlap": 0.0, "weight": "uniform"}
        cfg["members"][0]["tta"] = "hflip"
        cfg["runtime"]["forward_batch"] = 2  # two tiles in flight on either image
        cfg["submission"]["path"] = str(root / "sub.csv")
        (root / "p.yaml").write_text(yaml.safe_dump(cfg))
        script = (
            f"import resource, sys; sys.path.insert(0, {str(TESTS)!r}); from kaggle_tta.cli import main; "
            f"code = main(['run', {str(root / 'p.yaml')!r}, '-q']); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, code)"
        )
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        _, peak, code = next(line for line in out.stdout.splitlines() if line.startswith("PEAK")).split()
        assert code == "0"
        peaks[n] = int(peak)
    assert peaks[4096] - peaks[1024] < 120, json.dumps(peaks)
    rows = _rows(tmp_path / "4096" / "sub.csv")
    yy, xx = np.arange(4096)[:, None] // 700, np.arange(4096)[None, :] // 900
    assert rows["slide_r"] == mask_to_rle(((yy + xx) % 2) == 1, "F", True, "")


def test_a_cache_over_kaggles_working_quota_is_refused_before_the_first_forward(tmp_path, monkeypatch, capsys):
    """cache.dir under /kaggle/working (KAGGLE_WORKING_DIR here) with its quota set to 200 kB:
    a segmentation run whose maps need more stops at once, with the figures and the fix; the
    same run with its cache elsewhere (the notebook's default) goes ahead."""
    monkeypatch.syspath_prepend(str(TESTS))
    _images(tmp_path)
    working = tmp_path / "working"
    working.mkdir()
    monkeypatch.setenv("KAGGLE_WORKING_DIR", str(working))
    monkeypatch.setenv("KAGGLE_TTA_WORKING_QUOTA", str(200_000))
    path = _pipeline(tmp_path, cache={"dir": str(working / "cache")})
    assert main(["run", str(path), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quota" in err[0] and "m: 8 view(s) x 5 rows" in err[0] and "cache.dir outside" in err[0]
    assert not list(working.rglob("*.npy*"))
    path = _pipeline(tmp_path, cache={"dir": str(tmp_path / "scratch" / "cache")})
    assert main(["run", str(path), "-q"]) == 0
