"""Synthetic DICOM studies, for the local PACS (`medhive.localpacs`) to hold.

Studies are made instance by instance with `make_instance`, in the transfer syntaxes
archives hold: native (explicit VR, deflated) and compressed (RLE, JPEG baseline,
JPEG-LS and JPEG 2000 lossless), single- and multi-frame. The pixels are seeded by each
instance's UID (`synthetic_pixels`), so whoever reads one back knows what to expect.
This module needs the test extra (numpy, Pillow and the pydicom encoders).
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

#: Rows and columns of every synthetic image: small, so a study of hundreds is quick.
SIZE = 32
#: The pydicom encoding plugin for each compressed syntax it can write; JPEG baseline has
#: none in pydicom (only decoders), so Pillow encodes it (`_jpeg_baseline`).
ENCODERS: dict[str, str] = {
    RLELossless: "pydicom",
    JPEGLSLossless: "pyjpegls",
    JPEG2000Lossless: "pylibjpeg",
}


def synthetic_pixels(sop_uid: str, syntax: str, frames: int = 1, size: int = SIZE) -> np.ndarray:
    """The pixels `make_instance` gives instance `sop_uid` (as `pixel_array` shapes them):
    seeded by the UID, so a reader knows what a decoder must give back without keeping
    each image. Random 16-bit words where the syntax is lossless (nothing to gain from
    structure); for JPEG baseline, 8-bit (all it takes) smooth ramps with a little noise,
    which a lossy encoder keeps close where white noise would be smeared."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(sop_uid.encode()).digest()[:8]))
    shape = (frames, size, size)
    if syntax == JPEGBaseline8Bit:
        ramp = np.add.outer(np.arange(size), np.arange(size)) * 3 % 200
        offsets = np.arange(frames).reshape(-1, 1, 1) * 20
        pixels = (ramp + offsets + rng.integers(0, 16, size=shape)).astype(np.uint8)
    else:
        pixels = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    return pixels if frames > 1 else pixels[0]


def _jpeg_baseline(frame: np.ndarray) -> bytes:
    """One 8-bit grayscale frame as a JPEG baseline (ISO 10918-1, process 1) codestream."""
    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _encode(ds: Dataset, pixels: np.ndarray, syntax: str) -> None:
    """Put `pixels` into `ds` in transfer `syntax`; an encapsulated syntax gets one
    fragment per frame, as pydicom's encoders and most modalities write them."""
    frames = pixels.reshape(-1, *pixels.shape[-2:])
    if syntax == JPEGBaseline8Bit:
        ds.PixelData = encapsulate([_jpeg_baseline(frame) for frame in frames])
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
        ds.file_meta.TransferSyntaxUID = UID(syntax)
    elif syntax in ENCODERS:
        # a lossless re-encoding is the same image: it keeps its SOP Instance UID
        ds.compress(syntax, pixels, encoding_plugin=ENCODERS[syntax], generate_instance_uid=False)
    else:
        ds.PixelData = pixels.tobytes()  # native; a deflated syntax is deflated on saving
        ds.file_meta.TransferSyntaxUID = UID(syntax)


def make_instance(
    patient_id: str,
    study_uid: str,
    series_uid: str,
    number: int,
    syntax: str = ExplicitVRLittleEndian,
    sop_class: str = CTImageStorage,
    frames: int = 1,
    size: int = SIZE,
) -> bytes:
    """One small image of `sop_class` with `frames` frames of `synthetic_pixels`, as a DICOM
    file in transfer `syntax`. Only the attributes Orthanc indexes and the image pixel
    module are there: a PACS stores any storage SOP class without checking its IOD."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName = patient_id, f"TEST^{patient_id}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality = "CT" if sop_class == CTImageStorage else "OT"
    ds.InstanceNumber, ds.SeriesNumber = number, 1
    ds.StudyDate, ds.StudyTime = "20260101", "120000"
    pixels = synthetic_pixels(ds.SOPInstanceUID, syntax, frames, size)
    ds.Rows = ds.Columns = size
    bits = pixels.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    if frames > 1:
        ds.NumberOfFrames = frames
    _encode(ds, pixels, syntax)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
