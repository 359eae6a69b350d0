import gzip

import nibabel
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medfedpure.data.datasets import DataError, decode_image
from medfedpure.data.scans import list_scans, read_scan, scan_kind

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def write_dicom(path, pixels, photometric="MONOCHROME2", bits_stored=16, pixel_data=True, **tags):
    """A minimal uncompressed 16-bit MR DICOM of `pixels` ((rows, cols) or (frames, rows, cols))."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
    ds.PhotometricInterpretation = photometric
    for key, value in tags.items():
        setattr(ds, key, value)
    if pixel_data:
        ds.PixelData = np.asarray(pixels, dtype="<u2").tobytes()
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)
    return path


def write_nifti(path, data, slope=None, inter=None):
    img = nibabel.Nifti1Image(np.asarray(data), np.eye(4))
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nibabel.save(img, path)
    return path


def gray(scan):
    """The single channel of a grayscale read (all three equal)."""
    assert scan.dtype == np.uint8 and scan.shape[0] == 3
    assert (scan[0] == scan[1]).all() and (scan[0] == scan[2]).all()
    return scan[0]


def window(x, c, w):
    """DICOM PS3.3 C.11.2.1.2 linear VOI window to 0..255, written out case by case."""
    out = np.empty(x.shape)
    for i, v in np.ndenumerate(x):
        if v <= c - 0.5 - (w - 1) / 2:
            out[i] = 0
        elif v > c - 0.5 + (w - 1) / 2:
            out[i] = 255
        else:
            out[i] = ((v - (c - 0.5)) / (w - 1) + 0.5) * 255
    return np.round(out).astype(np.uint8)


def test_scan_kind_by_suffix_and_dicom_magic():
    assert scan_kind("a/B.PNG") == "image" and scan_kind("x.Tiff") == "image"
    assert scan_kind("s.dcm") == "dicom" and scan_kind("s.DICOM") == "dicom"
    assert scan_kind("brain.nii") == "nifti" and scan_kind("BRAIN.NII.GZ") == "nifti"
    assert scan_kind("IM0001", b"\0" * 128 + b"DICM") == "dicom"
    with pytest.raises(DataError, match="IM0001"):
        scan_kind("IM0001")
    with pytest.raises(DataError, match="notes.txt"):
        scan_kind("notes.txt", b"hello")


@pytest.mark.parametrize("mode,fmt", [("RGB", "PNG"), ("L", "PNG"), ("I;16", "PNG"), ("RGB", "JPEG")])
def test_photo_is_decode_image_bit_for_bit(tmp_path, mode, fmt):
    rng = np.random.default_rng(0)
    if mode == "RGB":
        arr = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    elif mode == "L":
        arr = rng.integers(0, 256, (30, 40), dtype=np.uint8)
    else:
        arr = rng.integers(0, 4096, (30, 40), dtype=np.uint16)
    path = tmp_path / f"scan.{fmt.lower()}"
    Image.fromarray(arr).save(path, fmt)
    expected = decode_image(path, 24)
    assert np.array_equal(read_scan(path, 24), expected)
    assert np.array_equal(read_scan(str(path), 24), expected)
    assert np.array_equal(read_scan(path.read_bytes(), 24, name=path.name), expected)


def test_dicom_ramp_is_scaled_min_to_max(tmp_path):
    ramp = 1000 + 10 * np.arange(256).reshape(16, 16)  # min..max -> 0..255 exactly
    path = write_dicom(tmp_path / "ramp.dcm", ramp)
    out = read_scan(path, 16)
    assert out.shape == (3, 16, 16)
    assert np.array_equal(gray(out), np.arange(256).reshape(16, 16))
    assert np.array_equal(read_scan(path.read_bytes(), 16, name="ramp.dcm"), out)


def test_dicom_12_bit_stored(tmp_path):
    ramp = (np.arange(256) * 16).reshape(16, 16)  # 0..4080
    out = gray(read_scan(write_dicom(tmp_path / "r12.dcm", ramp, bits_stored=12), 16))
    assert np.array_equal(out, np.arange(256).reshape(16, 16))


def test_monochrome1_is_inverted(tmp_path):
    ramp = np.random.default_rng(1).integers(0, 65536, (16, 16))
    m2 = gray(read_scan(write_dicom(tmp_path / "m2.dcm", ramp), 16)).astype(int)
    m1 = gray(read_scan(write_dicom(tmp_path / "m1.dcm", ramp, photometric="MONOCHROME1"), 16)).astype(int)
    assert np.abs(m1 - (255 - m2)).max() <= 1


def test_rescale_slope_intercept_before_window(tmp_path):
    # stored 300 / 500 / 700 -> 2x - 1000 = -400 / 0 / 400; window 0 +- 200
    pixels = np.full((8, 8), 500)
    pixels[0, 0], pixels[0, 1] = 300, 700
    path = write_dicom(tmp_path / "ct.dcm", pixels, RescaleSlope=2, RescaleIntercept=-1000,
                       WindowCenter=0, WindowWidth=401)
    out = gray(read_scan(path, 8))
    assert out[0, 0] == 0 and out[0, 1] == 255  # without rescale, 300 would be far above the window
    assert out[1, 1] == 128  # 0 -> (0.5 / 400 + 0.5) * 255


def test_window_clips_as_specified(tmp_path):
    pixels = np.linspace(850, 1150, 256).round().reshape(16, 16)
    pixels[0, 0], pixels[0, 1] = 0, 60000
    path = write_dicom(tmp_path / "w.dcm", pixels, WindowCenter=1000, WindowWidth=201)
    out = gray(read_scan(path, 16))
    assert np.array_equal(out, window(pixels, 1000, 201))
    assert out[0, 0] == 0 and out[0, 1] == 255
    # multi-valued window: the first one is used
    multi = write_dicom(tmp_path / "w2.dcm", pixels, WindowCenter=[1000, 50], WindowWidth=[201, 10])
    assert np.array_equal(gray(read_scan(multi, 16)), out)


def test_bad_dicoms_name_the_file(tmp_path):
    frames = np.zeros((3, 8, 8))
    multi = write_dicom(tmp_path / "multi.dcm", frames, NumberOfFrames=3)
    with pytest.raises(DataError, match=r"multi\.dcm.*multi-frame DICOM \(3 frames\); give one 2-D image"):
        read_scan(multi, 8)
    text = tmp_path / "scan.dcm"
    text.write_text("not a dicom at all\n" * 20)
    with pytest.raises(DataError, match="scan.dcm"):
        read_scan(text, 8)
    nopix = write_dicom(tmp_path / "nopix.dcm", np.zeros((8, 8)), pixel_data=False)
    with pytest.raises(DataError, match="nopix.dcm.*no pixel data"):
        read_scan(nopix, 8)
    good = write_dicom(tmp_path / "good.dcm", np.arange(64).reshape(8, 8)).read_bytes()
    for cut in (len(good) - 40, 200, 100):
        with pytest.raises(DataError, match="cut.dcm"):
            read_scan(good[:cut], 8, name="cut.dcm")


def test_empty_missing_and_unknown_files(tmp_path):
    for name in ("empty.dcm", "empty.png", "empty.nii.gz"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(DataError, match=f"{name}.*empty"):
            read_scan(tmp_path / name, 8)
        with pytest.raises(DataError, match=f"{name}.*empty"):
            read_scan(b"", 8, name=name)
    with pytest.raises(DataError, match="gone.dcm"):
        read_scan(tmp_path / "gone.dcm", 8)
    fake = tmp_path / "fake.png"
    fake.write_text("hello")
    with pytest.raises(DataError, match="fake.png"):
        read_scan(fake, 8)
    with pytest.raises(DataError, match="fake.png"):
        read_scan(b"hello", 8, name="fake.png")
    with pytest.raises(DataError, match="file name"):
        read_scan(b"hello", 8)
    (tmp_path / "notes.txt").write_text("x" * 200)
    with pytest.raises(DataError, match="notes.txt"):
        read_scan(tmp_path / "notes.txt", 8)


def test_dicom_without_suffix_is_sniffed(tmp_path):
    path = write_dicom(tmp_path / "IM0001", 1000 + 10 * np.arange(256).reshape(16, 16))
    assert np.array_equal(gray(read_scan(path, 16)), np.arange(256).reshape(16, 16))


def test_nifti_2d_and_3d_slices(tmp_path):
    plane = np.arange(16 * 12, dtype=np.int16).reshape(16, 12)  # (x, y)
    out = gray(read_scan(write_nifti(tmp_path / "p.nii", plane), 16))
    expected = Image.fromarray(np.rot90(np.round(plane / plane.max() * 255).astype(np.uint8)))
    expected = np.asarray(expected.convert("RGB").resize((16, 16), Image.Resampling.BILINEAR,
                                                         reducing_gap=None))[..., 0]
    assert np.array_equal(out, expected)
    # rot90: first voxel axis left to right, second bottom to top
    square = np.zeros((8, 8), dtype=np.int16)
    square[7, 0] = 1  # right, posterior (RAS) -> bottom right
    assert np.argwhere(gray(read_scan(write_nifti(tmp_path / "s.nii", square), 8))).tolist() == [[7, 7]]

    vol = np.zeros((8, 8, 5), dtype=np.float32)
    for k in range(5):
        vol[k, 0, k] = 1.0  # slice k: one bright voxel at x = k
    path = write_nifti(tmp_path / "v.nii", vol)
    assert np.argwhere(gray(read_scan(path, 8))).tolist() == [[7, 2]]  # middle slice, 5 // 2
    assert np.argwhere(gray(read_scan(path, 8, nifti_slice=4))).tolist() == [[7, 4]]
    assert np.argwhere(gray(read_scan(path, 8, nifti_slice=0))).tolist() == [[7, 0]]
    for bad in (5, -1):
        with pytest.raises(DataError, match=r"v\.nii.*0\.\.4"):
            read_scan(path, 8, nifti_slice=bad)


def test_nifti_gz_bytes_scaling_and_dimensions(tmp_path):
    vol = np.random.default_rng(2).integers(0, 1000, (12, 10, 3)).astype(np.int16)
    gz = write_nifti(tmp_path / "v.nii.gz", vol)
    assert gzip.decompress(gz.read_bytes())[:4]  # really gzipped
    from_path = read_scan(gz, 12)
    assert np.array_equal(read_scan(gz.read_bytes(), 12, name="v.nii.gz"), from_path)
    plain = write_nifti(tmp_path / "v.nii", vol)
    assert np.array_equal(read_scan(plain.read_bytes(), 12, name="v.nii"), from_path)
    # scl_slope/scl_inter are applied: a negative slope inverts the image
    flipped = read_scan(write_nifti(tmp_path / "f.nii", vol, slope=-2.0, inter=5.0), 12).astype(int)
    assert np.abs(flipped - (255 - from_path.astype(int))).max() <= 1
    # a trailing singleton dimension is a 3-D volume; a real 4-D series is not
    assert np.array_equal(read_scan(write_nifti(tmp_path / "t.nii", vol[..., None]), 12), from_path)
    with pytest.raises(DataError, match=r"fmri\.nii.*4-D NIfTI.*give a 2-D image or a 3-D volume"):
        read_scan(write_nifti(tmp_path / "fmri.nii", np.zeros((4, 4, 3, 2), np.int16)), 8)
    with pytest.raises(DataError, match=r"c\.nii' is blank"):  # a constant slice: nothing to classify
        read_scan(write_nifti(tmp_path / "c.nii", np.full((4, 4), 7, np.int16)), 4)
    with pytest.raises(DataError, match="junk.nii.gz"):
        read_scan(b"not gzip at all", 8, name="junk.nii.gz")
    with pytest.raises(DataError, match="junk.nii"):
        read_scan(b"not nifti" * 50, 8, name="junk.nii")


def test_same_pixels_as_png_dicom_and_nifti_read_alike(tmp_path):
    """A Br35H-style grayscale PNG and the same pixels as 16-bit DICOM and as NIfTI."""
    rng = np.random.default_rng(3)
    ramp = np.linspace(0, 255, 64)[None, :] + np.linspace(0, 60, 48)[:, None]
    png = np.clip(ramp * 0.8 + rng.normal(0, 12, (48, 64)), 0, 255).round().astype(np.uint8)
    png[0, 0], png[-1, -1] = 0, 255  # full range, so min..max scaling is the identity
    Image.fromarray(png).save(tmp_path / "y1.png")
    write_dicom(tmp_path / "y1.dcm", png.astype(np.uint16) * 257)
    write_nifti(tmp_path / "y1.nii.gz", np.rot90(png, k=-1).astype(np.int16))  # rot90 restores it
    ref = read_scan(tmp_path / "y1.png", 32)
    assert np.array_equal(ref, decode_image(tmp_path / "y1.png", 32))
    for name in ("y1.png", "y1.dcm", "y1.nii.gz"):
        for source in (tmp_path / name, (tmp_path / name).read_bytes()):
            out = read_scan(source, 32, name=name)
            assert out.shape == (3, 32, 32)
            assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1, name


def test_list_scans(tmp_path):
    root = tmp_path / "in"
    for rel in ("b.png", "a.DCM", "sub/c.nii.gz", "sub/deep/d.nii", ".hidden.png", ".cache/e.png",
                "notes.txt", "sub/readme.md"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (tmp_path / "IM0001").write_bytes(b"x")
    (root / "sub" / "IM0002").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)  # a scanner's suffix-less DICOM
    found = list_scans([root, str(tmp_path / "IM0001")])
    assert found == sorted([root / "a.DCM", root / "b.png", root / "sub/IM0002", root / "sub/c.nii.gz",
                            root / "sub/deep/d.nii"]) + [tmp_path / "IM0001"]
    assert list_scans([]) == []
    with pytest.raises(DataError, match="missing.png"):
        list_scans([root, tmp_path / "missing.png"])
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "x.txt").write_text("x")
    with pytest.raises(DataError, match="empty.*holds no scans"):
        list_scans([tmp_path / "empty"])


def test_scans_it_should_refuse_are_refused_before_they_cost_memory(tmp_path, monkeypatch):
    """A blank scan, a NaN voxel, an image whose header promises too many pixels, a NIfTI that
    inflates too far: one error naming the file, not a confident answer or a gigabyte of memory."""
    import medfedpure.data.datasets as datasets
    import medfedpure.data.scans as scans

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "blank.png")
    with pytest.raises(DataError, match="blank.png' is blank"):
        read_scan(tmp_path / "blank.png", 16)
    vol = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    vol[2, 3, 1] = np.nan  # one NaN voxel in the middle slice
    with pytest.raises(DataError, match="nan.nii': the slice holds NaN"):
        read_scan(write_nifti(tmp_path / "nan.nii", vol), 8)
    assert read_scan(write_nifti(tmp_path / "other.nii", vol), 8, nifti_slice=0).any()  # the other slices are fine
    monkeypatch.setattr(datasets, "MAX_SCAN_PIXELS", 1000)  # a 40 x 40 image stands in for a 12000 x 12000 one
    Image.fromarray(np.full((40, 40), 9, np.uint8)).save(tmp_path / "huge.png")
    for source in (tmp_path / "huge.png", (tmp_path / "huge.png").read_bytes()):
        with pytest.raises(DataError, match="huge.png' is 40 x 40 pixels, more than the 1,000"):
            read_scan(source, 16, name="huge.png")
    monkeypatch.setattr(scans, "MAX_NIFTI_BYTES", 2000)
    gz = write_nifti(tmp_path / "bomb.nii.gz", np.zeros((64, 64, 4), np.int16))
    with pytest.raises(DataError, match=r"bomb.nii.gz' inflates to 33,\d+ bytes, more than the 2,000"):
        read_scan(gz.read_bytes(), 16, name="bomb.nii.gz")


def test_the_domain_knows_the_hospitals_sizes_and_channels_and_names_a_scan_far_from_them(tmp_path):
    """Sizes and channels come from the files' headers; a scan read from bytes reports the same."""
    from medfedpure.data.scans import domain_of, image_geometry, out_of_domain

    rng = np.random.default_rng(0)
    files = []
    for i, (w, h, mode) in enumerate([(200, 240, "L"), (300, 300, "RGB"), (400, 380, "L")]):
        gray = rng.integers(60, 200, (h, w), dtype=np.uint8)
        Image.fromarray(gray).convert(mode).save(tmp_path / f"s{i}.png")
        files.append(tmp_path / f"s{i}.png")
    scans = np.stack([read_scan(f, 16) for f in files])
    domain = domain_of(scans, [image_geometry(f) for f in files])
    assert domain["side"] == [200, 400] and domain["channels"] == [1, 3]
    geometry = {}
    x = read_scan(files[0].read_bytes(), 16, name="s0.png", geometry=geometry)
    assert geometry == {"width": 200, "height": 240, "channels": 1}
    assert out_of_domain(x, domain, geometry) == []
    Image.fromarray(rng.integers(60, 200, (60, 90), dtype=np.uint8)).convert("RGBA").save(tmp_path / "tiny.png")
    geometry = {}
    x = read_scan(tmp_path / "tiny.png", 16, geometry=geometry)
    reasons = out_of_domain(x, domain, geometry)
    assert reasons[-2:] == ["size 90 x 60 pixels, far from the hospital's scans (200 to 400 pixels a side)",
                            "4 channel(s), where the hospital's scans have 1 or 3"]
