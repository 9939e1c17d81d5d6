"""A photo's own metadata, read before any model runs: EXIF GPS, capture time, camera and orientation.

Investigators read the metadata first. It can be stripped, wrong or planted, so by default it is shown beside
the visual answer rather than replacing it (``agent.use_exif`` makes it the answer). Reading is header-only
(no pixels are decoded) and never raises: a file without usable metadata gives None, and a GPS block that is
malformed or partial (a missing hemisphere, a zero denominator, text where numbers belong) gives no position
rather than a wrong one.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from PIL import Image

# EXIF tag numbers (EXIF 2.32 / TIFF 6.0).
TAG_MAKE, TAG_MODEL, TAG_ORIENTATION, TAG_DATETIME = 0x010F, 0x0110, 0x0112, 0x0132
IFD_EXIF, IFD_GPS = 0x8769, 0x8825
TAG_DATETIME_ORIGINAL, TAG_DATETIME_DIGITIZED = 0x9003, 0x9004
TAG_OFFSET_TIME, TAG_OFFSET_TIME_ORIGINAL, TAG_OFFSET_TIME_DIGITIZED = 0x9010, 0x9011, 0x9012
GPS_LAT_REF, GPS_LAT, GPS_LON_REF, GPS_LON, GPS_ALT_REF, GPS_ALT, GPS_STATUS = 1, 2, 3, 4, 5, 6, 9

EXIF_DATETIME_FORMAT = "%Y:%m:%d %H:%M:%S"
ORIENTATIONS = range(1, 9)  # the eight EXIF orientations; anything else is junk
BELOW_SEA_LEVEL = 1  # GPSAltitudeRef: 0 above sea level, 1 below
GPS_VOID = "V"  # GPSStatus: "A" measurement active, "V" void (the receiver had no fix)
NULL_ISLAND = (0.0, 0.0)  # what receivers without a fix write; no photo worth locating was taken there
MAX_UTC_OFFSET_HOURS = 14  # UTC+14 (Kiribati) is the furthest any clock runs


class ExifGPS(BaseModel):
    """Where the camera says it was: degrees (south and west negative), metres above sea level."""

    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)
    altitude_m: float | None = None


class ExifInfo(BaseModel):
    """What a photo's EXIF says about it. ``taken_at`` carries its UTC offset when the camera recorded one
    (OffsetTimeOriginal); without one it is the camera's local clock, naive."""

    gps: ExifGPS | None = None
    taken_at: datetime | None = None
    make: str | None = None
    model: str | None = None
    orientation: int | None = None

    @property
    def camera(self) -> str | None:
        """"Canon PowerShot S5 IS", "Apple iPhone 7": the make once, even where the model repeats it."""
        make, model = self.make or "", self.model or ""
        if make and model.lower().startswith(make.split()[0].lower()):
            return model
        return " ".join(part for part in (make, model) if part) or None


def read_exif(path: str | Path) -> ExifInfo | None:
    """The photo's EXIF (header only: no pixel is decoded; blocking: call it from a worker thread), or None
    when it carries none of these fields or cannot be read (opening the photo itself reports what is wrong
    with the file: not a regular file, too many pixels, ...)."""
    from geoagent.images import open_header

    try:
        with open_header(path) as image:
            return exif_info(header_exif(image))
    except Exception:  # noqa: BLE001 - Pillow raises many kinds on corrupt files; the visual pipeline reports them
        return None


def header_exif(image: Image.Image) -> Image.Exif:
    """The EXIF block of a lazily opened image, read without decoding its pixels. Pillow's PNG ``getexif()``
    decodes the whole image to look for an eXIf chunk after the image data; here the chunks are walked
    instead (their headers only, at most PNG_MAX_CHUNKS of them)."""
    if image.format == "PNG" and "exif" not in image.info and "Raw profile type exif" not in image.info and image.fp is not None:
        late = _png_late_exif(image.fp)
        if late is not None:
            image.info["exif"] = late
        else:
            from PIL import Image as PILImage

            return PILImage.Image.getexif(image)  # the base class reads info only: never loads pixels
    return image.getexif()


PNG_SIGNATURE_BYTES = 8
PNG_MAX_CHUNKS = 100_000  # a walk past this many chunks gives up (no EXIF) rather than crawl a hostile file
PNG_MAX_EXIF_BYTES = 4 * 1024 * 1024


def _png_late_exif(fh: Any) -> bytes | None:
    """The payload of a PNG's eXIf chunk wherever it lies (as Pillow stores it: ``Exif\\0\\0`` + data), found
    by hopping from chunk header to chunk header; None when there is none or the file ends early."""
    where = fh.tell()
    try:
        fh.seek(PNG_SIGNATURE_BYTES)
        for _ in range(PNG_MAX_CHUNKS):
            head = fh.read(8)
            if len(head) < 8:
                return None
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind == b"eXIf":
                data = fh.read(length) if length <= PNG_MAX_EXIF_BYTES else b""
                return b"Exif\x00\x00" + data if data and len(data) == length else None
            if kind == b"IEND":
                return None
            fh.seek(length + 4, 1)  # the data and its CRC
        return None
    finally:
        fh.seek(where)


def has_gps(path: str | Path) -> bool:
    """Whether the photo's EXIF carries a GPS position (blocking: header only)."""
    exif = read_exif(path)
    return exif is not None and exif.gps is not None


def exif_info(exif: Image.Exif) -> ExifInfo | None:
    """The fields of an already parsed EXIF block; None when it holds none of them."""
    info = ExifInfo(
        gps=gps_from_ifd(_ifd(exif, IFD_GPS)),
        taken_at=_taken_at(exif, _ifd(exif, IFD_EXIF)),
        make=_text(exif.get(TAG_MAKE)),
        model=_text(exif.get(TAG_MODEL)),
        orientation=_orientation(exif.get(TAG_ORIENTATION)),
    )
    return None if info == ExifInfo() else info


def gps_from_ifd(gps: Any) -> ExifGPS | None:
    """Signed degrees from a GPS IFD, or None unless latitude, longitude and both hemisphere refs are all
    there and well formed (and the receiver did not mark the fix void)."""
    if not gps:
        return None
    lat_ref, lon_ref = _ref(gps.get(GPS_LAT_REF), "NS"), _ref(gps.get(GPS_LON_REF), "EW")
    lat, lon = _degrees(gps.get(GPS_LAT)), _degrees(gps.get(GPS_LON))
    if lat_ref is None or lon_ref is None or lat is None or lon is None or _ref(gps.get(GPS_STATUS), "AV") == GPS_VOID:
        return None
    signed_lat = float(-lat if lat_ref == "S" else lat)
    signed_lon = float(-lon if lon_ref == "W" else lon)
    if not (-90 <= signed_lat <= 90 and -180 <= signed_lon <= 180) or (signed_lat, signed_lon) == NULL_ISLAND:
        return None
    return ExifGPS(lat=signed_lat, lon=signed_lon, altitude_m=_altitude(gps.get(GPS_ALT), gps.get(GPS_ALT_REF)))


def _ifd(exif: Image.Exif, tag: int) -> dict[int, Any]:
    try:
        return dict(exif.get_ifd(tag))
    except Exception:  # noqa: BLE001 - a broken sub-IFD loses its own fields, not the rest
        return {}


def _fraction(value: Any) -> Fraction | None:
    """An EXIF rational exactly (Pillow's IFDRational is a numbers.Rational); a zero denominator, text or a
    non-finite number: None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Rational):
        return Fraction(int(value.numerator), int(value.denominator)) if value.denominator else None
    if isinstance(value, float) and math.isfinite(value):
        return Fraction(value)
    return None


def _degrees(value: Any) -> Fraction | None:
    """Degrees from EXIF's (degrees, minutes, seconds) rationals; writers that omit seconds or minutes too
    are read as such. Negative parts are malformed (the hemisphere lives in the ref)."""
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or not 1 <= len(value) <= 3:
        return None
    parts = [_fraction(v) for v in value]
    if any(p is None or p < 0 for p in parts):
        return None
    return sum((p / 60**i for i, p in enumerate(parts) if p is not None), Fraction(0))


def _ref(value: Any, allowed: str) -> str | None:
    """A one-letter ref ("N", "S", ...) among ``allowed``; None when missing or anything else."""
    text = _text(value)
    return text.upper() if text is not None and len(text) == 1 and text.upper() in allowed else None


def _altitude(value: Any, ref: Any) -> float | None:
    altitude = _fraction(value)
    if altitude is None:
        return None
    below = ref[0] if isinstance(ref, bytes) and ref else ref
    return float(-altitude if below == BELOW_SEA_LEVEL else altitude)


def _text(value: Any) -> str | None:
    """An ASCII field without its padding (cameras pad with spaces and NULs); None when empty or not text."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str):
        return None
    return value.replace("\x00", " ").strip() or None


def _orientation(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value in ORIENTATIONS else None


def _taken_at(exif: Image.Exif, sub: dict[int, Any]) -> datetime | None:
    """When the shutter fired (DateTimeOriginal), else digitised, else the file's DateTime; each with its own
    offset tag when the camera wrote one."""
    for stamp, offset in (
        (sub.get(TAG_DATETIME_ORIGINAL), sub.get(TAG_OFFSET_TIME_ORIGINAL)),
        (sub.get(TAG_DATETIME_DIGITIZED), sub.get(TAG_OFFSET_TIME_DIGITIZED)),
        (exif.get(TAG_DATETIME), sub.get(TAG_OFFSET_TIME)),
    ):
        moment = _datetime(stamp)
        if moment is not None:
            zone = _offset(offset)
            return moment.replace(tzinfo=zone) if zone is not None else moment
    return None


def _datetime(value: Any) -> datetime | None:
    text = _text(value)
    try:
        return datetime.strptime(text[:19], EXIF_DATETIME_FORMAT) if text else None
    except ValueError:  # "0000:00:00 00:00:00" and other placeholders
        return None


def _offset(value: Any) -> timezone | None:
    """"+08:00" / "-05:00" as a timezone; None for a missing or malformed offset."""
    text = _text(value)
    if text is None or len(text) != 6 or text[0] not in "+-" or text[3] != ":":
        return None
    try:
        hours, minutes = int(text[1:3]), int(text[4:6])
    except ValueError:
        return None
    if hours > MAX_UTC_OFFSET_HOURS or minutes >= 60:
        return None
    sign = -1 if text[0] == "-" else 1
    return timezone(sign * timedelta(hours=hours, minutes=minutes))
