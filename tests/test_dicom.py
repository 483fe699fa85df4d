"""cascade.data.dicom on the real SIIM and CR files, on synthetic bit depths, and on every kind of bad file."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import DeflatedExplicitVRLittleEndian, MPEG2MPML, HTJ2KLossless, SecondaryCaptureImageStorage

from cascade.data.dicom import DicomImage, read_dicom, read_patient_key
from cascade.errors import ConfigError, DicomError

SIIM_6904 = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819"


@pytest.fixture(scope="module")
def siim_files(shared_data: Path) -> list[Path]:
    files = sorted((shared_data / "siim" / "sample-images").glob("*.dcm"))
    assert len(files) == 11
    return files


@pytest.fixture(scope="module")
def cr_lossless(shared_data: Path) -> DicomImage:
    return read_dicom(shared_data / "dicom" / "cr-chest-monochrome1-j2k-lossless.dcm")


# --- real files ---------------------------------------------------------------------------------------------------


def test_siim_samples_read_as_8bit_images_named_by_their_stem(siim_files: list[Path]) -> None:
    for path in siim_files:
        image = read_dicom(path)
        ds = pydicom.dcmread(path)
        assert image.image_id == path.stem == ds.SOPInstanceUID
        assert (image.height, image.width) == (1024, 1024) == image.pixels.shape
        assert image.pixels.dtype == np.float32
        assert image.source == str(path)
        # 8-bit MONOCHROME2, no rescale: exactly the stored values / 255.
        np.testing.assert_array_equal(image.pixels * np.float32(255), ds.pixel_array.astype(np.float32))
        assert image.pixel_spacing == (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1]))
        expected_key = hashlib.sha256(ds.PatientID.encode()).hexdigest()[:16]
        assert image.patient_key == expected_key == read_patient_key(path)
        assert ds.PatientID not in image.patient_key


def test_monochrome1_header_gives_the_inverted_image(shared_data: Path, siim_files: list[Path]) -> None:
    original = read_dicom(next(p for p in siim_files if p.stem == SIIM_6904))
    flipped = read_dicom(shared_data / "dicom" / "siim-6904-header-monochrome1.dcm")
    assert flipped.pixels.shape == original.pixels.shape
    assert np.abs(flipped.pixels - (1.0 - original.pixels)).max() <= 1 / 255 + 1e-6
    assert np.abs(flipped.pixels - original.pixels).mean() > 0.2  # the two really differ


def test_cr_chest_monochrome1_j2k_has_dark_air_and_bright_mediastinum(cr_lossless: DicomImage) -> None:
    px = cr_lossless.pixels
    assert (cr_lossless.height, cr_lossless.width) == px.shape == (1955, 1841)
    assert cr_lossless.pixel_spacing is None  # the header says 0.000 \ 0.000: no usable spacing
    h, w = px.shape

    def region(r0: float, r1: float, c0: float, c1: float) -> float:
        return float(px[int(r0 * h) : int(r1 * h), int(c0 * w) : int(c1 * w)].mean())

    corners = max(region(0.03, 0.10, 0.0, 0.08), region(0.03, 0.10, 0.92, 1.0))  # air above the shoulders
    lungs = min(region(0.2, 0.45, 0.2, 0.3), region(0.2, 0.45, 0.7, 0.8))
    mediastinum = region(0.3, 0.8, 0.45, 0.55)  # spine and heart
    assert corners + 0.15 < lungs and lungs + 0.15 < mediastinum, (corners, lungs, mediastinum)


def test_cr_chest_lossy_is_close_to_lossless(shared_data: Path, cr_lossless: DicomImage) -> None:
    lossy = read_dicom(shared_data / "dicom" / "cr-chest-monochrome1-j2k-lossy.dcm")
    diff = np.abs(lossy.pixels - cr_lossless.pixels)
    assert diff.mean() < 0.005 and diff.max() < 0.05


def test_pillow_and_gdcm_decode_identically(shared_data: Path, siim_files: list[Path]) -> None:
    files = [*siim_files, shared_data / "dicom" / "cr-chest-monochrome1-j2k-lossy.dcm"]
    for path in files:
        decoded = {}
        for plugin in ("pillow", "gdcm"):
            ds = pydicom.dcmread(path)
            ds.pixel_array_options(decoding_plugin=plugin)
            decoded[plugin] = read_dicom(ds).pixels
        np.testing.assert_array_equal(decoded["pillow"], decoded["gdcm"])
        np.testing.assert_array_equal(decoded["pillow"], read_dicom(path).pixels)


def test_file_object_and_dataset_give_the_same_image_as_the_path(siim_files: list[Path]) -> None:
    path = siim_files[0]
    by_path = read_dicom(path)
    with path.open("rb") as fp:
        by_file = read_dicom(fp)
    by_dataset = read_dicom(pydicom.dcmread(path))
    unseekable = read_dicom(_Unseekable(path.read_bytes()))
    for other, source in ((by_file, "<file object>"), (by_dataset, "<dataset>"), (unseekable, "<file object>")):
        np.testing.assert_array_equal(other.pixels, by_path.pixels)
        assert other.image_id == by_path.image_id
        assert other.patient_key == by_path.patient_key
        assert other.pixel_spacing == by_path.pixel_spacing
        assert other.source == source


class _Unseekable(io.RawIOBase):
    """A pipe-like stream: readable once, not seekable."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, buffer: bytearray) -> int:
        return self._data.readinto(buffer)


def test_files_without_preamble_or_file_meta_still_read(tmp_path: Path, siim_files: list[Path]) -> None:
    source = siim_files[0]
    expected = read_dicom(source).pixels
    no_preamble = tmp_path / "no-preamble.dcm"
    no_preamble.write_bytes(source.read_bytes()[132:])  # file meta, but no preamble or 'DICM'
    np.testing.assert_array_equal(read_dicom(no_preamble).pixels, expected)

    ds = pydicom.dcmread(source)
    ds.decompress(generate_instance_uid=False)
    del ds.file_meta
    ds.preamble = None
    for implicit in (True, False):
        bare = tmp_path / f"bare-{implicit}.dcm"
        pydicom.dcmwrite(bare, ds, implicit_vr=implicit, little_endian=True)
        assert bare.read_bytes()[:2] == b"\x08\x00"  # starts straight with (0008,0005)
        image = read_dicom(bare)
        np.testing.assert_array_equal(image.pixels, expected)
        assert image.image_id == source.stem


# --- synthetic bit depths -------------------------------------------------------------------------------------------


def _synthetic(
    tmp_path: Path, stored: np.ndarray, bits_stored: int, photometric: str = "MONOCHROME2", **elements: object
) -> Path:
    """Write a native (uncompressed) greyscale DICOM holding ``stored`` with extra header ``elements``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.set_pixel_data(stored, photometric, bits_stored)
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    path = tmp_path / f"synthetic-{len(list(tmp_path.iterdir()))}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_12_bit_stored_in_16_bits_scales_by_bits_stored(tmp_path: Path) -> None:
    stored = np.array([[0, 1, 2048], [4095, 1000, 7]], dtype=np.uint16)
    image = read_dicom(_synthetic(tmp_path, stored, 12))
    np.testing.assert_allclose(image.pixels, stored / 4095.0, rtol=0, atol=1e-7)
    assert image.pixels.dtype == np.float32


def test_signed_12_bit_uses_the_signed_range(tmp_path: Path) -> None:
    stored = np.array([[-2048, -1, 0], [2047, 100, -100]], dtype=np.int16)
    image = read_dicom(_synthetic(tmp_path, stored, 12))
    np.testing.assert_allclose(image.pixels, (stored + 2048.0) / 4095.0, rtol=0, atol=1e-7)


def test_signed_16_bit_with_negative_rescale_slope_flips_the_scale(tmp_path: Path) -> None:
    # Output = -2 * stored + 1000: larger stored values mean darker, and the range is that of the rescaled values.
    stored = np.array([[-32768, 0], [32767, 1234]], dtype=np.int16)
    image = read_dicom(_synthetic(tmp_path, stored, 16, RescaleSlope=-2, RescaleIntercept=1000))
    rescaled = -2.0 * stored + 1000.0
    low, high = -2.0 * 32767 + 1000, -2.0 * -32768 + 1000
    np.testing.assert_allclose(image.pixels, (rescaled - low) / (high - low), rtol=0, atol=1e-7)
    assert image.pixels[0, 0] == 1.0 and image.pixels[1, 0] == 0.0


def test_8_bit_monochrome1_is_inverted_exactly(tmp_path: Path) -> None:
    stored = np.array([[0, 255], [51, 204]], dtype=np.uint8)
    image = read_dicom(_synthetic(tmp_path, stored, 8, "MONOCHROME1"))
    np.testing.assert_allclose(image.pixels, 1.0 - stored / 255.0, rtol=0, atol=1e-7)


def test_modality_lut_sequence_is_applied_and_scaled_by_its_output_range(tmp_path: Path) -> None:
    item = Dataset()
    item.LUTDescriptor = [4, 0, 16]
    item.add(DataElement(0x00283006, "US", [100, 200, 300, 1100]))  # LUTData
    stored = np.array([[0, 1], [2, 3], [200, 5]], dtype=np.uint8)  # 200 and 5 lie past the table: last entry
    image = read_dicom(_synthetic(tmp_path, stored, 8, ModalityLUTSequence=[item], ModalityLUTType="US"))
    np.testing.assert_allclose(image.pixels, [[0.0, 0.1], [0.2, 1.0], [1.0, 1.0]], rtol=0, atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(
    bits_stored=st.integers(1, 16),
    signed=st.booleans(),
    monochrome1=st.booleans(),
    slope=st.sampled_from([1.0, 0.5, -3.0, 2.5]),
    intercept=st.sampled_from([0.0, -1024.0, 7.5]),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_bit_depth_maps_its_stored_range_onto_0_1(
    bits_stored: int, signed: bool, monochrome1: bool, slope: float, intercept: float, seed: int
) -> None:
    lo, hi = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (0, 2**bits_stored - 1)
    dtype = (np.int16 if signed else np.uint16) if bits_stored > 8 else (np.int8 if signed else np.uint8)
    stored = np.random.default_rng(seed).integers(lo, hi, size=(4, 6), endpoint=True).astype(dtype)
    stored.flat[:2] = lo, hi
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.set_pixel_data(stored, "MONOCHROME1" if monochrome1 else "MONOCHROME2", bits_stored)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    expected = (stored.astype(np.float64) - lo) / (hi - lo)
    if slope < 0:  # a negative slope makes large stored values the small (dark) output values
        expected = 1.0 - expected
    if monochrome1:
        expected = 1.0 - expected
    np.testing.assert_allclose(read_dicom(ds).pixels, expected, rtol=0, atol=2e-6)


def test_header_fields_and_their_fallbacks(tmp_path: Path) -> None:
    stored = np.zeros((3, 5), dtype=np.uint8)
    path = _synthetic(tmp_path, stored, 8, ImagerPixelSpacing=[0.1, 0.2], PatientID="  ")
    ds = pydicom.dcmread(path)
    image = read_dicom(path)
    assert (image.height, image.width) == (3, 5)
    assert image.pixel_spacing == (0.1, 0.2)
    assert image.patient_key is None and read_patient_key(path) is None
    assert image.image_id == ds.SOPInstanceUID

    del ds.SOPInstanceUID
    ds.PatientID = "PAT-0001"
    assert read_dicom(ds).image_id == "unknown"
    assert read_dicom(ds).patient_key == hashlib.sha256(b"PAT-0001").hexdigest()[:16]
    no_uid = tmp_path / "named-by-stem.dcm"
    ds.save_as(no_uid)
    assert read_dicom(no_uid).image_id == "named-by-stem"
    assert read_dicom(no_uid).pixel_spacing == (0.1, 0.2)


def test_a_rescale_slope_of_zero_is_refused(tmp_path: Path) -> None:
    path = _synthetic(tmp_path, np.zeros((2, 2), dtype=np.uint8), 8, RescaleSlope=0, RescaleIntercept=5)
    with pytest.raises(DicomError, match="no contrast"):
        read_dicom(path)


# --- bad input ------------------------------------------------------------------------------------------------------


def _native(source: Path) -> Dataset:
    ds = pydicom.dcmread(source)
    ds.decompress(generate_instance_uid=False)
    return ds


def _truncated(source: Path, path: Path) -> None:
    path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])


def _header_cut(source: Path, path: Path) -> None:
    path.write_bytes(source.read_bytes()[:700])  # ends inside the SOP Instance UID


def _no_pixel_data(source: Path, path: Path) -> None:
    ds = pydicom.dcmread(source)
    del ds.PixelData
    ds.save_as(path)


def _short_pixel_data(source: Path, path: Path) -> None:
    ds = _native(source)
    ds.PixelData = ds.PixelData[: 1024 * 1000]
    ds.save_as(path)


def _rgb(source: Path, path: Path) -> None:
    ds = _native(source)
    ds.PixelData = np.repeat(ds.pixel_array[..., None], 3, axis=2).tobytes()
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.save_as(path)


def _multi_frame(source: Path, path: Path) -> None:
    ds = _native(source)
    ds.PixelData = ds.PixelData * 2
    ds.NumberOfFrames = 2
    ds.save_as(path)


def _rows(value: int):
    def make(source: Path, path: Path) -> None:
        ds = pydicom.dcmread(source)
        ds.Rows = value
        ds.save_as(path)

    return make


def _syntax(uid: str):
    def make(source: Path, path: Path) -> None:
        ds = pydicom.dcmread(source)
        ds.file_meta.TransferSyntaxUID = uid
        ds.save_as(path)

    return make


def _bomb(source: Path, path: Path) -> None:
    """A few-KB file that declares 16384 x 16384 16-bit pixels: a decoder would allocate 512 MiB and more."""
    ds = pydicom.dcmread(source)
    ds.Rows = ds.Columns = 16384
    ds.save_as(path)


def _deflated(source: Path, path: Path) -> None:
    ds = _native(source)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def _cut_jpeg_stream(source: Path, path: Path) -> None:
    ds = pydicom.dcmread(source)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 2]])  # a well-formed file around half a JPEG
    ds.save_as(path)


def _random_bytes(source: Path, path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())


def _garbage_after_prefix(source: Path, path: Path) -> None:
    path.write_bytes(b"\0" * 128 + b"DICM" + np.random.default_rng(1).integers(0, 256, 5000, np.uint8).tobytes())


def _text(source: Path, path: Path) -> None:
    path.write_text("ImageId,EncodedPixels\n1.2.3,-1\n")


def _empty(source: Path, path: Path) -> None:
    path.write_bytes(b"")


def _missing(source: Path, path: Path) -> None:
    pass


def _directory(source: Path, path: Path) -> None:
    path.mkdir()


BAD_FILES = [
    (_truncated, "truncated file"),
    (_header_cut, "truncated file"),
    (_no_pixel_data, "no pixel data"),
    (_short_pixel_data, "pixel data shorter than the header says"),
    (_rgb, "colour image"),
    (_multi_frame, "multi-frame"),
    (_rows(0), "absurd image size"),
    (_rows(20000), "absurd image size"),
    (_rows(512), "the compressed stream declares 1024 x 1024 pixels, the header says 512 x 1024; refused before"),
    (_bomb, "image of 16384 x 16384 pixels is over the pixel budget of 25,000,000 pixels (--max-pixels); refused"),
    (_deflated, "the Deflated transfer syntax is not supported"),
    (_cut_jpeg_stream, "cannot decode the JPEG Baseline (Process 1) pixel data"),
    (_syntax("1.2.3.4.5"), "transfer syntax (an unknown UID) is not supported"),
    (_syntax(MPEG2MPML), "MPEG2 Main Profile / Main Level is not supported"),
    (_random_bytes, "not a DICOM file"),
    (_garbage_after_prefix, "truncated file (the last element declares"),
    (_text, "not a DICOM file"),
    (_empty, "empty file"),
    (_missing, "does not exist"),
    (_directory, "is a directory"),
]


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")
@pytest.mark.parametrize(("make", "reason"), BAD_FILES, ids=[m.__qualname__.split(".")[0] for m, _ in BAD_FILES])
def test_bad_files_raise_one_line_naming_the_file_and_no_patient_data(
    tmp_path: Path, siim_files: list[Path], make, reason: str
) -> None:
    source = siim_files[0]
    header = pydicom.dcmread(source, stop_before_pixels=True)
    path = tmp_path / "bad.dcm"
    make(source, path)
    with pytest.raises(DicomError) as caught:
        read_dicom(path)
    _check_message(str(caught.value), str(path), reason, header)
    error = caught.value  # pydicom's own exception (which may quote header values) is not chained on
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def _check_message(message: str, name: str, reason: str, header: Dataset) -> None:
    assert message.startswith(f"{name}: "), message
    assert reason in message, message
    assert "\n" not in message
    for identifier in (str(header.PatientName), header.PatientID):
        assert identifier and identifier not in message


def test_a_missing_decoder_names_the_package_to_install(tmp_path: Path, siim_files: list[Path]) -> None:
    if get_decoder(HTJ2KLossless).is_available:
        pytest.skip("an HTJ2K decoder is installed here")
    path = tmp_path / "htj2k.dcm"
    _syntax(HTJ2KLossless)(siim_files[0], path)
    with pytest.raises(DicomError) as caught:
        read_dicom(path)
    header = pydicom.dcmread(siim_files[0], stop_before_pixels=True)
    _check_message(str(caught.value), str(path), "install pylibjpeg", header)
    assert "pylibjpeg-openjpeg" in str(caught.value)


def test_bad_file_objects_and_datasets_are_named_generically(siim_files: list[Path]) -> None:
    with pytest.raises(DicomError, match=r"^<file object>: empty file$"):
        read_dicom(io.BytesIO(b""))
    with pytest.raises(DicomError, match=r"^<file object>: not a DICOM file$"):
        read_dicom(io.BytesIO(os.urandom(3000)))
    ds = pydicom.dcmread(siim_files[0])
    ds.NumberOfFrames = 3
    with pytest.raises(DicomError, match=r"^<dataset>: multi-frame"):
        read_dicom(ds)


def test_read_patient_key_refuses_bad_files(tmp_path: Path) -> None:
    with pytest.raises(DicomError, match="does not exist"):
        read_patient_key(tmp_path / "absent.dcm")
    junk = tmp_path / "junk.dcm"
    _random_bytes(junk, junk)
    with pytest.raises(DicomError, match=r"junk\.dcm: not a DICOM file"):
        read_patient_key(junk)


def test_the_pixel_budget_is_checked_from_the_header_and_the_stream_before_decoding(
    tmp_path: Path, shared_data: Path, siim_files: list[Path]
) -> None:
    source = siim_files[0]  # 1024 x 1024 JPEG Baseline
    assert read_dicom(source, max_pixels=1024 * 1024).height == 1024
    with pytest.raises(DicomError, match=r"over the pixel budget of 1,048,575 pixels \(--max-pixels\)"):
        read_dicom(source, max_pixels=1024 * 1024 - 1)
    with pytest.raises(ConfigError, match="max_pixels must be a positive whole number"):
        read_dicom(source, max_pixels=0)
    # JPEG 2000: the SIZ segment's size is checked against the header, so a small header cannot hide a big stream
    ds = pydicom.dcmread(shared_data / "dicom" / "cr-chest-monochrome1-j2k-lossless.dcm")
    ds.Rows, ds.Columns = 64, 64
    ds.save_as(tmp_path / "j2k.dcm")
    with pytest.raises(DicomError, match="the compressed stream declares 1955 x 1841 pixels, the header says 64 x 64"):
        read_dicom(tmp_path / "j2k.dcm")


def test_a_jpeg_that_hides_its_size_past_its_first_segments_is_refused(tmp_path: Path, siim_files: list[Path]) -> None:
    """Application segments put the frame header past where a short look would stop: still checked, and a stream
    whose size is nowhere before its data is refused rather than handed to a decoder that trusts it."""
    ds = pydicom.dcmread(siim_files[0])
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    padding = (b"\xff\xe1" + (65535).to_bytes(2, "big") + bytes(65533)) * 3  # three full APP1 segments
    ds.PixelData = encapsulate([frame[:2] + padding + frame[2:]])
    ds.Rows = 512
    ds.save_as(tmp_path / "padded.dcm")
    with pytest.raises(DicomError, match="the compressed stream declares 1024 x 1024 pixels, the header says 512"):
        read_dicom(tmp_path / "padded.dcm")
    ds.PixelData = encapsulate([frame[:2] + padding])  # no frame header at all
    ds.save_as(tmp_path / "headless.dcm")
    with pytest.raises(DicomError, match="the compressed stream does not declare its size"):
        read_dicom(tmp_path / "headless.dcm")
