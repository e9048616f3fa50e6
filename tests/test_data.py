import random

import numpy as np
import pytest
from PIL import Image

from fnexport.data import Preprocess, list_images, load_images, make_calibration, open_images
from fnexport.errors import BadInput


@pytest.fixture
def mixed_folder(tmp_path):
    """Grayscale, RGBA, palette, CMYK, 16-bit, JPEG and PNG, one truncated file and one text file."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a_rgb.jpg")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "b_gray.png")
    Image.fromarray(np.dstack([rgb, np.full((40, 60), 128, np.uint8)])).save(tmp_path / "c_rgba.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "d_palette.bmp")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "e_cmyk.jpg")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(tmp_path / "f_16bit.png")
    Image.fromarray(rgb).save(tmp_path / "g.webp")
    good = (tmp_path / "a_rgb.jpg").read_bytes()
    (tmp_path / "h_truncated.jpg").write_bytes(good[: len(good) // 3])
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_mixed_images_load_with_one_warning(mixed_folder, caplog):
    s = load_images(mixed_folder, Preprocess(32))
    assert s.x.shape == (7, 3, 32, 32) and s.x.dtype == np.float32
    assert s.skipped == [str(mixed_folder / "h_truncated.jpg")]
    assert sum("h_truncated.jpg" in r.message for r in caplog.records) == 1
    assert s.labels is None
    assert np.isfinite(s.x).all()
    # 16-bit is scaled, not clipped: the 16-bit copy of channel 0 matches the 8-bit grayscale one
    gray = s.x[s.files.index("b_gray.png")]
    sixteen = s.x[s.files.index("f_16bit.png")]
    assert np.abs(gray - sixteen).max() < 0.05


def test_preprocessing_is_resize_crop_normalise():
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    x = Preprocess(64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.8)(img)
    assert x.shape == (3, 64, 64)
    assert np.allclose(x[0], 1.0) and np.allclose(x[1], -1.0)


def test_sampling_is_deterministic_and_labelled(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / cls / f"{i}.png")
    a = load_images(tmp_path, Preprocess(32), samples=6, seed=3)
    b = load_images(tmp_path, Preprocess(32), samples=6, seed=3)
    assert a.files == b.files and a.classes == ["cat", "dog"]
    assert [a.classes[i] for i in a.labels] == [f.split("/")[0] for f in a.files]


def test_no_usable_images_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="no images"):
        load_images(tmp_path, Preprocess(32))
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(BadInput, match="none of the 1 images"):
        load_images(tmp_path, Preprocess(32))


def test_embedded_sets():
    natural = load_images("embedded:natural", Preprocess(64))
    assert len(natural.x) >= 80 and natural.labels is None
    digits = load_images("embedded:digits", Preprocess(32, crop_pct=1.0), samples=50)
    assert digits.classes == [str(i) for i in range(10)] and len(digits.labels) == 50
    with pytest.raises(BadInput, match="unknown embedded set"):
        load_images("embedded:cifar", Preprocess(32))


def test_make_calibration_is_stratified(tmp_path):
    from fnexport.data import embedded

    n = make_calibration(embedded("digits"), tmp_path / "cal", per_class=3)
    assert n == 30
    assert sorted(len(list(d.iterdir())) for d in (tmp_path / "cal").iterdir()) == [3] * 10


def _tree(root, classes=("cat", "dog"), per_class=10):
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8 + i, 8), (i * 20, 0, 0)).save(root / cls / f"{i}.png")
    return root


def test_stream_keeps_the_sample_labels_and_skips_of_the_whole_set(tmp_path, caplog):
    """Batches of exactly `size` readable images, in the seeded sample's file order, labels by folder."""
    _tree(tmp_path)
    (tmp_path / "dog" / "99_bad.png").write_bytes(b"garbage")
    stream = open_images(tmp_path, Preprocess(32), samples=15, seed=3)
    # the selection is the one the gate always drew: a seeded sample of the sorted recursive listing
    assert stream.files == sorted(random.Random(3).sample(list_images(tmp_path), 15))
    assert stream.count == 15 and stream.labelled and stream.classes == ["cat", "dog"]
    parts = list(stream.batches(4))
    bad = str(tmp_path / "dog" / "99_bad.png") in map(str, stream.files)
    assert [len(x) for x, _, _ in parts] == [4, 4, 4, 3 - bad]
    assert stream.skipped == ([str(tmp_path / "dog" / "99_bad.png")] if bad else [])
    assert sum("99_bad.png" in r.message for r in caplog.records) == int(bad)
    files = [f for _, _, names in parts for f in names]
    labels = np.concatenate([y for _, y, _ in parts])
    assert [stream.classes[i] for i in labels] == [f.split("/")[0] for f in files]
    whole = load_images(tmp_path, Preprocess(32), samples=15, seed=3)
    assert whole.files == files and np.array_equal(whole.labels, labels)
    assert np.array_equal(whole.x, np.concatenate([x for x, _, _ in parts]))


def test_stream_decodes_only_a_bounded_number_ahead(tmp_path, monkeypatch):
    """Memory stays flat: a consumer that takes one batch has caused at most AHEAD more to be decoded."""
    import fnexport.data as data

    _tree(tmp_path, per_class=100)
    decoded = []
    monkeypatch.setattr(data.ImageStream, "_decode", lambda self, path: decoded.append(path) or np.zeros((3, 4, 4)))
    batches = open_images(tmp_path, Preprocess(4)).batches(5)
    x, y, _ = next(batches)
    assert x.shape == (5, 3, 4, 4) and y.tolist() == [0] * 5
    assert 5 <= len(decoded) <= (data.AHEAD + 1) * 5
    batches.close()  # a consumer that stops early: the queued rest is dropped, not decoded
    assert len(decoded) <= (data.AHEAD + 1) * 5
    assert sum(len(x) for x, _, _ in open_images(tmp_path, Preprocess(4)).batches(7)) == 200
