"""Geotags written back where photo managers read them: XMP sidecars beside the photos (``batch --xmp``).

For each located photo without GPS of its own whose answer cleared the confidence threshold (it did not
abstain), a sidecar ``photo.jpg.xmp`` (digiKam, darktable, Immich) or ``photo.xmp`` (``--xmp-name stem``,
Lightroom) gets ``exif:GPSLatitude``/``exif:GPSLongitude`` in XMP's own notation (``48,51.50400000N``), WGS-84,
and a ``geoagent:`` namespace recording how sure the answer is and where it came from.

Rules, so a person can trust it with their library: the photo file is never opened for writing; a sidecar
that already holds GPS is never overwritten (the camera, or the person, said otherwise); an existing
sidecar is merged, every other tag kept (ratings, keywords, faces); a sidecar that is not valid XMP is left
untouched and named; each sidecar is written atomically. The XMP is read and written by Exiv2 (through
pyexiv2, the ``[xmp]`` extra): the engine digiKam keeps its own sidecars with, bundled in the wheel.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from geoagent.errors import ConfigError
from geoagent.files import write_atomic
from geoagent.paths import display_path

NAMESPACE = "http://ns.geoagent.dev/xmp/1.0/"
PREFIX = "geoagent"
SidecarName = Literal["full", "stem"]  # photo.jpg.xmp | photo.xmp
MINUTE_DECIMALS = 8  # 1e-8 arc minutes is about 2e-10 degrees: far below the 1e-6 degrees a reader compares
EMPTY_PACKET = (
    b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/">\n <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
    b' </rdf:RDF>\n</x:xmpmeta>\n<?xpacket end="w"?>\n'
)
GPS_KEYS = ("Xmp.exif.GPSLatitude", "Xmp.exif.GPSLongitude")
XMP_EXTRA = "XMP sidecars need the xmp extra: pip install 'geoagent-vlm[xmp]'"


def require_xmp() -> None:
    """Before any photo is located: ``--xmp`` without the extra is a one-line usage error."""
    try:
        import pyexiv2  # noqa: F401  (a few milliseconds: Exiv2 is a bundled shared library)
    except ImportError:
        raise ConfigError(XMP_EXTRA) from None


def xmp_coordinate(value: float, positive: str, negative: str) -> str:
    """XMP's GPSCoordinate notation, ``DDD,MM.mmmmmmmmK`` (XMP Specification Part 2, exif namespace)."""
    units = 10**MINUTE_DECIMALS
    total = round(abs(value) * 60 * units)  # whole units of 1e-8 minute: no minute ever rounds up to 60
    degrees, minutes = divmod(total, 60 * units)
    return f"{degrees},{minutes // units}.{minutes % units:0{MINUTE_DECIMALS}d}{positive if value >= 0 else negative}"


def sidecar_path(photo: Path, name: SidecarName) -> Path:
    return photo.with_name(photo.name + ".xmp") if name == "full" else photo.with_suffix(".xmp")


@dataclass
class SidecarReport:
    """What ``--xmp`` did (or, with ``dry_run``, would do)."""

    written: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)  # already hold this very answer (a rerun)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (photo, why): GPS of its own, abstained, ...
    invalid: list[tuple[Path, str]] = field(default_factory=list)  # sidecars that are not XMP: left untouched


def properties(entry: dict[str, Any], when: dt.datetime) -> dict[str, str]:
    """The tags one answer writes: the position and the GeoAgent record of how it was obtained."""
    from geoagent import __version__

    stats = entry.get("stats") or {}
    return {
        "Xmp.exif.GPSLatitude": xmp_coordinate(entry["lat"], "N", "S"),
        "Xmp.exif.GPSLongitude": xmp_coordinate(entry["lon"], "E", "W"),
        "Xmp.exif.GPSMapDatum": "WGS-84",
        f"Xmp.{PREFIX}.Confidence": f"{entry['confidence']:.4f}",
        f"Xmp.{PREFIX}.Calibrated": "True" if entry.get("calibrated") else "False",
        f"Xmp.{PREFIX}.ConfidenceKm": f"{entry.get('confidence_km', 25.0):g}",
        f"Xmp.{PREFIX}.Source": "near_duplicate" if entry.get("match") == "near_duplicate" else entry.get("source", "visual"),
        f"Xmp.{PREFIX}.Model": str(stats.get("model") or entry.get("model") or ""),
        f"Xmp.{PREFIX}.Strategy": str(entry.get("strategy") or ""),
        f"Xmp.{PREFIX}.Version": __version__,
        f"Xmp.{PREFIX}.Date": when.isoformat(timespec="seconds"),
    }


def _why_not(entry: dict[str, Any]) -> str | None:
    """Why a journal entry gets no sidecar, or None."""
    if "error" in entry:
        return "not located"
    if entry.get("abstained") or entry.get("lat") is None or entry.get("lon") is None:
        return "below the confidence threshold (abstained)"
    exif = entry.get("exif") or {}
    if entry.get("source") == "exif" or exif.get("gps"):
        return "has GPS of its own"
    return None


def write_sidecars(
    entries: Iterable[dict[str, Any]], *, name: SidecarName = "full", dry_run: bool = False,
    model: str = "", strategy: str = "", say: Callable[[str], None] = lambda _line: None,
) -> SidecarReport:
    """A sidecar for every entry that earns one; ``say`` gets one line per sidecar written, would-be written or refused."""
    import pyexiv2

    pyexiv2.registerNs(NAMESPACE, PREFIX)
    pyexiv2.set_log_level(4)  # Exiv2's own warnings would bypass GeoAgent's one-line reporting
    report = SidecarReport()
    when = dt.datetime.now(dt.timezone.utc)
    for entry in entries:
        photo = Path(entry.get("image", ""))
        if (reason := _why_not(entry)) is not None:
            report.skipped.append((display_path(photo), reason))
            continue
        if not photo.is_file():
            report.skipped.append((display_path(photo), "photo not found beside the journal's path"))
            continue
        sidecar = sidecar_path(photo, name)
        wanted = properties({**entry, "model": model, "strategy": strategy}, when)
        try:
            existing = sidecar.read_bytes() if sidecar.exists() else None
            with pyexiv2.ImageData(existing if existing is not None else EMPTY_PACKET) as xmp:
                tags = xmp.read_xmp()
                if any(key in tags for key in GPS_KEYS):
                    mine = tags.get(GPS_KEYS[0]) == wanted[GPS_KEYS[0]] and tags.get(GPS_KEYS[1]) == wanted[GPS_KEYS[1]]
                    if mine:
                        report.unchanged.append(sidecar)
                    else:
                        report.skipped.append((display_path(photo), f"{display_path(sidecar)} already holds GPS: kept as it is"))
                    continue
                if dry_run:
                    report.written.append(sidecar)
                    say(f"would write {display_path(sidecar)}: {wanted[GPS_KEYS[0]]} {wanted[GPS_KEYS[1]]}")
                    continue
                xmp.modify_xmp(wanted)
                data = xmp.get_bytes()
        except RuntimeError as exc:  # Exiv2: not XMP, or corrupt
            report.invalid.append((sidecar, str(exc) or "not valid XMP"))
            say(f"{display_path(sidecar)}: not valid XMP ({exc}); left untouched")
            continue
        write_atomic(sidecar, data)
        report.written.append(sidecar)
        say(f"wrote {display_path(sidecar)}")
    return report
