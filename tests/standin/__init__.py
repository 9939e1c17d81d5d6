"""The stand-in VLM server the tests talk to over real HTTP, and the markers it reads from images."""

from standin.judge import Knobs, WorldJudge, marker_judge
from standin.markers import draw_marker, marked_scene, read_marker
from standin.server import Faults, SeenRequest, StandinConfig, StandinServer

__all__ = ["Knobs", "WorldJudge", "Faults", "SeenRequest", "StandinConfig", "StandinServer", "draw_marker", "marked_scene", "marker_judge", "read_marker"]
