import numpy as np
import pytest
from PIL import Image

from fnexport.data import Preprocess, load_images, make_calibration
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
