"""Pixel data as WADO-RS serves it (PS3.18 8.7, 10.4): the representation an Accept header asks for, frames,
transcoding with pydicom, and rendering to PNG/JPEG with a VOI window.

Why a module of its own: every one of these can meet pixel data no installed codec reads (12-bit JPEG
Extended has a decoder *registered* in pydicom, GDCM and Pillow, yet neither decodes 12-bit samples), and
each such case must end in a 406 that says why and what to ask for instead (``transfer-syntax=*``: the
instance as stored), never in a server error. What cannot be served is decided from the transfer syntax
before anything is streamed where possible; a decoder that fails on the data itself says so the same way.
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.filereader import read_file_meta_info
from pydicom.pixels import get_decoder, get_encoder, pixel_array
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    JPEG2000MC,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MPEGTransferSyntaxes,
    RLELossless,
)

log = logging.getLogger("voxelflow.ingest.pixels")

NATIVE = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian}
)
#: transfer syntaxes whose encoding loses information: voxelflow serves them only as they were stored
LOSSY = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEG2000, JPEG2000MC, JPEGLSNearLossless, HTJ2K})
#: PS3.18 Table 8.7.3-4/-5: the media types of bulk data (frames) and the transfer syntaxes each may carry;
#: the first is the media type's default
BULK_MEDIA: dict[str, tuple[str, ...]] = {
    "application/octet-stream": (ExplicitVRLittleEndian,),
    "image/jpeg": (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1),
    "image/jls": (JPEGLSLossless, JPEGLSNearLossless),
    "image/x-jls": (JPEGLSLossless, JPEGLSNearLossless),
    "image/jp2": (JPEG2000Lossless, JPEG2000),
    "image/jpx": (JPEG2000MCLossless, JPEG2000MC),
    "image/jphc": (HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K),
    "image/x-dicom-rle": (RLELossless,),
    "image/dicom-rle": (RLELossless,),
}
DICOM = "application/dicom"
ANY = "*"


class NotAcceptableError(ValueError):
    """406: the representation asked for cannot be produced here; the message says why and what to ask."""


class BadRequestError(ValueError):
    """400: a malformed frame list or rendering parameter."""


class NoSuchFrameError(LookupError):
    """404: a frame number past the instance's last frame."""


# ------------------------------------------------------------------------------------- Accept


@dataclass(frozen=True)
class MediaRange:
    media_type: str
    params: dict[str, str]
    q: float = 1.0


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    items: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header, most preferred first (ties keep their order); ``*/*`` when
    there is none. Malformed ranges are skipped, as RFC 9110 lets a server do."""
    ranges: list[MediaRange] = []
    for item in _split_outside_quotes(header or "*/*", ","):
        media_type, *raw_params = _split_outside_quotes(item, ";")
        params: dict[str, str] = {}
        for raw in raw_params:
            key, _, value = raw.partition("=")
            params[key.strip().lower()] = value.strip().strip('"')
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            continue
        if "/" in media_type and q > 0:
            ranges.append(MediaRange(media_type.strip().lower(), params, q))
    return sorted(ranges, key=lambda r: -r.q) or [MediaRange("*/*", {})]


# ------------------------------------------------------------------------------------- what can be served


def _name(uid: str) -> str:
    return f"{uid} ({UID(uid).name})"


def _decodable(stored: str) -> str | None:
    """Why pixel data stored in ``stored`` cannot be decoded here (by transfer syntax alone), or None."""
    if UID(stored) in NATIVE or not UID(stored).is_compressed:
        return None
    try:
        if get_decoder(stored).is_available:
            return None
    except NotImplementedError:
        pass
    return f"no installed decoder for {_name(stored)}"


def serving_problem(stored: str, target: str) -> str | None:
    """Why an instance stored in ``stored`` cannot be served in ``target`` here, or None when it can."""
    if target == stored:
        return None
    if target == ExplicitVRBigEndian:
        return "Explicit VR Big Endian is retired (PS3.5) and not produced"
    if not UID(target).is_transfer_syntax:
        return f"{target} is not a transfer syntax"
    if UID(stored) in MPEGTransferSyntaxes:
        return f"{_name(stored)} is a video stream, served only as stored"
    if target in LOSSY:
        return f"{_name(target)} is lossy: voxelflow serves lossy encodings only as they were stored"
    problem = _decodable(stored)
    if problem:
        return problem
    if UID(target) not in NATIVE:
        try:
            available = get_encoder(target).is_available
        except NotImplementedError:
            available = False
        if not available:
            return f"no installed encoder for {_name(target)}"
    return None


@dataclass(frozen=True)
class Representation:
    """What a response carries: the part media type and the transfer syntax (None: each as stored)."""

    media_type: str
    transfer_syntax: str | None

    def part_content_type(self, stored: str) -> str:
        syntax = self.transfer_syntax or stored
        media = self.media_type if self.transfer_syntax else stored_media_type(self.media_type, stored)
        return f"{media}; transfer-syntax={syntax}"


def stored_media_type(kind: str, stored: str) -> str:
    """The media type of an instance (``application/dicom``) or of its bulk data as stored."""
    if kind == DICOM:
        return DICOM
    if UID(stored) in NATIVE or not UID(stored).is_compressed:
        return "application/octet-stream"
    if UID(stored) in MPEGTransferSyntaxes:
        return "video/mpeg" if "MPEG2" in UID(stored).keyword else "video/mp4"
    for media, syntaxes in BULK_MEDIA.items():
        if stored in syntaxes:
            return media
    return "application/octet-stream"


def negotiate(accept: str | None, kind: str, stored: Iterable[str]) -> Representation:
    """The representation of instances (``kind`` application/dicom) or bulk data (application/octet-stream)
    that the Accept header prefers and every stored transfer syntax can be served in; NotAcceptableError
    with every reason otherwise.

    PS3.18 8.7.3.5: without a transfer-syntax parameter the default is Explicit VR Little Endian for both
    (decompressed); ``transfer-syntax=*`` means as stored."""
    stored_set = sorted(set(stored))
    reasons: list[str] = []
    for media_range in parse_accept(accept):
        if media_range.media_type in ("*/*", "multipart/*"):
            part, syntax = (DICOM if kind == DICOM else "application/octet-stream"), None
        elif media_range.media_type == "multipart/related":
            part = media_range.params.get("type", DICOM if kind == DICOM else "application/octet-stream").lower()
            syntax = media_range.params.get("transfer-syntax")
        else:
            reasons.append(f"{media_range.media_type}: WADO-RS answers multipart/related")
            continue
        if kind == DICOM and part != DICOM:
            reasons.append(f'type="{part}": instances are application/dicom')
            continue
        if kind != DICOM and part not in BULK_MEDIA:
            reasons.append(f'type="{part}": bulk data media types are {", ".join(BULK_MEDIA)}')
            continue
        if syntax == ANY:
            if kind != DICOM and any(UID(s) in MPEGTransferSyntaxes for s in stored_set):
                reasons.append("video pixel data has no separate frames: retrieve its bulk data")
                continue
            return Representation(part, None)
        target = syntax or (ExplicitVRLittleEndian if kind == DICOM else BULK_MEDIA[part][0])
        if kind != DICOM and target not in BULK_MEDIA[part]:
            reasons.append(f"{part} cannot carry transfer syntax {target}")
            continue
        problems = [p for s in stored_set if (p := serving_problem(s, target))]
        if not problems:
            return Representation(part, target)
        reasons.append(f"{_name(target)}: {'; '.join(sorted(set(problems)))}")
    raise NotAcceptableError(
        "cannot serve the representation asked for: "
        + " | ".join(reasons)
        + ". Ask for the instances as stored with transfer-syntax=* (Accept: multipart/related; "
        f'type="{DICOM if kind == DICOM else "application/octet-stream"}"; transfer-syntax=*)'
    )


# ------------------------------------------------------------------------------------- transcoding


def _decode_failure(ds: Dataset, exc: Exception) -> NotAcceptableError:
    stored = str(ds.file_meta.get("TransferSyntaxUID", ""))
    detail = " ".join(str(exc).split())[:400]
    return NotAcceptableError(
        f"the pixel data ({_name(stored)}) cannot be decoded by the installed decoders: {detail}. "
        "Retrieve it as stored with transfer-syntax=*"
    )


def transcode(ds: Dataset, target: str) -> Dataset:
    """``ds`` (changed in place) with its pixel data in ``target``; the SOP Instance UID is kept, as a
    lossless transcode does not make a new instance. NotAcceptableError when it cannot be done."""
    stored = str(ds.file_meta.TransferSyntaxUID)
    if stored == target:
        return ds
    problem = serving_problem(stored, target)
    if problem:
        raise NotAcceptableError(problem)
    try:
        if UID(stored).is_compressed:
            ds.decompress(generate_instance_uid=False)
        elif stored == ExplicitVRBigEndian and int(ds.get("BitsAllocated", 8)) > 8 and "PixelData" in ds:
            values = pixel_array(ds, raw=True)
            ds.PixelData = values.astype(values.dtype.newbyteorder("<")).tobytes()
            ds["PixelData"].VR = "OW"
    except Exception as exc:
        raise _decode_failure(ds, exc) from exc
    if UID(target).is_compressed:
        try:
            ds.compress(target, generate_instance_uid=False)
        except Exception as exc:
            raise NotAcceptableError(f"cannot encode this pixel data as {_name(target)}: {exc}") from exc
    else:
        ds.file_meta.TransferSyntaxUID = UID(target)
    return ds


def encode_instance(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------- frames


def number_of_frames(ds: Dataset) -> int:
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def parse_frame_list(text: str, count: int) -> list[int]:
    """PS3.18 10.4.1.1.5: a comma-separated list of 1-based frame numbers."""
    numbers: list[int] = []
    for item in text.split(","):
        if not re.fullmatch(r"\s*[0-9]{1,9}\s*", item) or int(item) < 1:
            raise BadRequestError(f"frame list {text[:80]!r}: frame numbers are integers from 1, comma-separated")
        numbers.append(int(item))
    beyond = [n for n in numbers if n > count]
    if beyond:
        raise NoSuchFrameError(f"no frame {beyond[0]}: the instance has {count} frame(s)")
    return numbers


def _pixel_keyword(ds: Dataset) -> str:
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            return keyword
    raise NotAcceptableError("the instance has no pixel data")


def frames(ds: Dataset, numbers: Sequence[int]) -> list[bytes]:
    """The frames of ``ds`` in its current transfer syntax: encapsulated ones as their codestreams,
    native ones as their bytes (little endian; bit-packed frames repacked from their first bit)."""
    count = number_of_frames(ds)
    keyword = _pixel_keyword(ds)
    value = ds[keyword].value
    if UID(str(ds.file_meta.TransferSyntaxUID)).is_encapsulated:
        try:
            every = list(generate_frames(value, number_of_frames=count))
        except Exception as exc:
            raise NotAcceptableError(f"the encapsulated pixel data cannot be split into {count} frames: {exc}") from exc
        return [every[n - 1] for n in numbers]
    samples = int(ds.get("Rows", 0)) * int(ds.get("Columns", 0)) * int(ds.get("SamplesPerPixel", 1))
    bits = int(ds.get("BitsAllocated", 8))
    if bits == 1 and samples % 8:
        unpacked = np.unpackbits(np.frombuffer(value, dtype=np.uint8), bitorder="little")
        return [np.packbits(unpacked[(n - 1) * samples : n * samples], bitorder="little").tobytes() for n in numbers]
    size = samples * bits // 8
    return [bytes(value[(n - 1) * size : n * size]) for n in numbers]


def pixel_bulk(ds: Dataset) -> list[bytes]:
    """The pixel data element's value as bulk data: native as one part, encapsulated as one part per frame
    (a video stream as one part)."""
    keyword = _pixel_keyword(ds)
    stored = UID(str(ds.file_meta.TransferSyntaxUID))
    if stored in MPEGTransferSyntaxes:
        return [b"".join(generate_frames(ds[keyword].value, number_of_frames=1))]
    if stored.is_encapsulated:
        return frames(ds, range(1, number_of_frames(ds) + 1))
    return [bytes(ds[keyword].value)]


def undecodable_reason(ds: Dataset) -> str | None:
    """Why the installed decoders cannot decode this instance's first frame, or None. Decoding one frame
    is the only honest test: 12-bit JPEG Extended has decoders registered that refuse 12-bit samples."""
    stored = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    if not stored or not UID(stored).is_compressed:
        return None
    problem = _decodable(stored)
    if problem:
        return problem
    try:
        pixel_array(ds, index=0)
    except Exception as exc:
        return f"the installed decoders cannot decode {_name(stored)}: {' '.join(str(exc).split())[:300]}"
    return None


def undecodable_series_reason(paths: Sequence[Any]) -> str | None:
    """Why the pixel data of a series' files cannot be decoded here, or None: one file per compressed
    transfer syntax is tried (the header alone cannot tell, see :func:`undecodable_reason`)."""
    tried: set[str] = set()
    for path in paths:
        try:
            syntax = str(read_file_meta_info(path).get("TransferSyntaxUID", "") or "")
        except Exception:  # unreadable files are the reconstruction's to report
            continue
        if syntax in tried or not syntax or not UID(syntax).is_compressed:
            continue
        tried.add(syntax)
        reason = undecodable_reason(dcmread(path))
        if reason:
            return reason
    return None


# ------------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class RenderOptions:
    """PS3.18 8.3.5.1: ``window=center,width[,function]``, ``viewport=vw,vh[,sx,sy,sw,sh]``, ``quality``."""

    window: tuple[float, float, str] | None = None
    viewport: tuple[int, int] | None = None
    region: tuple[int, int, int, int] | None = None
    quality: int = 90


WINDOW_FUNCTIONS = ("linear", "linear-exact", "sigmoid")
RENDERED_MEDIA = ("image/jpeg", "image/png")


def parse_render_options(
    window: str | None, viewport: str | None, quality: str | None, default_viewport: tuple[int, int] | None = None
) -> RenderOptions:
    parsed_window = None
    if window:
        parts = [p.strip() for p in window.split(",")]
        function = parts[2].lower() if len(parts) == 3 else "linear"
        try:
            center, width = float(parts[0]), float(parts[1])
        except (ValueError, IndexError):
            center = width = math.nan
        if len(parts) not in (2, 3) or not (math.isfinite(center) and math.isfinite(width)) or width < 1:
            raise BadRequestError("window must be center,width[,function] with a width of at least 1")
        if function not in WINDOW_FUNCTIONS:
            raise BadRequestError(f"window function {function!r}: one of {', '.join(WINDOW_FUNCTIONS)}")
        parsed_window = (center, width, function)
    size, region = default_viewport, None
    if viewport:
        parts = [p.strip() for p in viewport.split(",")]
        if len(parts) not in (2, 6) or not all(re.fullmatch(r"[0-9]{1,5}", p) for p in parts):
            raise BadRequestError("viewport must be vw,vh or vw,vh,sx,sy,sw,sh (non-negative integers)")
        numbers = [int(p) for p in parts]
        if not 1 <= numbers[0] <= 4096 or not 1 <= numbers[1] <= 4096:
            raise BadRequestError("viewport width and height must be from 1 to 4096")
        size = (numbers[0], numbers[1])
        if len(numbers) == 6:
            if numbers[4] < 1 or numbers[5] < 1:
                raise BadRequestError("viewport region width and height must be at least 1")
            region = (numbers[2], numbers[3], numbers[4], numbers[5])
    level = 90
    if quality is not None:
        if not re.fullmatch(r"[0-9]{1,3}", quality) or not 1 <= int(quality) <= 100:
            raise BadRequestError("quality must be an integer from 1 to 100")
        level = int(quality)
    return RenderOptions(parsed_window, size, region, level)


def rendered_media_type(accept: str | None) -> str:
    """image/jpeg (PS3.18's default for rendered resources) or image/png, as the Accept header prefers."""
    for media_range in parse_accept(accept):
        if media_range.media_type in ("*/*", "image/*"):
            return "image/jpeg"
        if media_range.media_type in RENDERED_MEDIA:
            return media_range.media_type
    raise NotAcceptableError(f"rendered images are {' or '.join(RENDERED_MEDIA)}")


def _frame_item(ds: Dataset, index: int, sequence: str) -> Dataset | None:
    """The item of a functional group macro for one frame (per-frame first, then shared), or None."""
    for groups, position in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and position < len(items) and sequence in items[position]:
            inner = getattr(items[position], sequence)
            if len(inner):
                return inner[0]
    return None


def _first_number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value)
    except (TypeError, ValueError, IndexError):
        return None
    return number if math.isfinite(number) else None


def _modality(ds: Dataset, index: int, values: np.ndarray) -> np.ndarray:
    """Rescale slope/intercept (top level, or the frame's Pixel Value Transformation)."""
    source = _frame_item(ds, index, "PixelValueTransformationSequence") or ds
    slope = _first_number(source.get("RescaleSlope"))
    intercept = _first_number(source.get("RescaleIntercept"))
    out = values.astype(np.float64)
    if slope is not None and slope != 0:
        out = out * slope
    if intercept is not None:
        out = out + intercept
    return out


def _window_of(ds: Dataset, index: int, values: np.ndarray) -> tuple[float, float, str]:
    source = _frame_item(ds, index, "FrameVOILUTSequence") or ds
    center = _first_number(source.get("WindowCenter"))
    width = _first_number(source.get("WindowWidth"))
    function = str(source.get("VOILUTFunction", "LINEAR") or "LINEAR").lower().replace("_", "-")
    if center is not None and width is not None and width >= 1:
        return center, width, function if function in WINDOW_FUNCTIONS else "linear"
    low, high = float(np.min(values)), float(np.max(values))
    return (low + high) / 2, max(high - low, 1.0), "linear-exact"


def apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2: VOI LUT functions onto 0..255."""
    if function == "sigmoid":
        out = 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    elif function == "linear-exact":
        out = ((values - center) / width + 0.5) * 255.0
    else:
        out = ((values - (center - 0.5)) / (width - 1 if width > 1 else 1) + 0.5) * 255.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render(ds: Dataset, index: int, media_type: str, options: RenderOptions) -> bytes:
    """Frame ``index`` (0-based) as a PNG or JPEG: modality LUT, VOI window (the query's, else the
    instance's, else the frame's range), MONOCHROME1 inverted, fitted into the viewport.

    Every bundled real file renders; a stored instance whose pixel layout is stranger than these (it passed
    validation, which does not decode) is a 406 with the error, logged as a bug to look at, not a 500."""
    try:
        values = pixel_array(ds, index=index)
    except Exception as exc:
        raise _decode_failure(ds, exc) from exc
    try:
        return _render(ds, index, values, media_type, options)
    except (BadRequestError, NotAcceptableError):
        raise
    except Exception as exc:
        log.exception("rendering %s failed", ds.get("SOPInstanceUID", "?"))
        raise NotAcceptableError(f"this pixel data cannot be rendered here: {type(exc).__name__}: {exc}") from exc


def _render(ds: Dataset, index: int, values: np.ndarray, media_type: str, options: RenderOptions) -> bytes:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if values.ndim == 3 and values.shape[-1] in (3, 4):  # colour (YBR decoded to RGB by pydicom)
        bits = int(ds.get("BitsStored", 8) or 8)
        rgb = values[..., :3].astype(np.float64) * (255.0 / max((1 << bits) - 1, 1))
        image = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    else:
        values = values.reshape(values.shape[-2:]) if values.ndim > 2 else values
        if int(ds.get("BitsAllocated", 8)) == 1:
            gray = (values.astype(np.uint8) * 255).astype(np.uint8)
        else:
            modality = _modality(ds, index, values)
            center, width, function = options.window or _window_of(ds, index, modality)
            gray = apply_window(modality, center, width, function)
        if photometric == "MONOCHROME1":
            gray = 255 - gray
        image = Image.fromarray(gray, "L")
    if options.region:
        sx, sy, sw, sh = options.region
        if sx >= image.width or sy >= image.height:
            raise BadRequestError(f"viewport region starts outside the {image.width}x{image.height} image")
        image = image.crop((sx, sy, min(sx + sw, image.width), min(sy + sh, image.height)))
    if options.viewport:
        vw, vh = options.viewport
        scale = min(vw / image.width, vh / image.height)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if media_type == "image/png":
        image.save(out, format="PNG")
    else:
        image.save(out, format="JPEG", quality=options.quality)
    return out.getvalue()
