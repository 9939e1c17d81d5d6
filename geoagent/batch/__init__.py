"""``geoagent batch``: many photos, streamed through an engine, every outcome journalled as it comes.

- :mod:`~geoagent.batch.inputs`: INPUT (a folder, a CSV with a path column, a text file of paths), read lazily.
- :mod:`~geoagent.batch.journal`: the append-only, fsynced JSON Lines journal that makes a run resumable.
- :mod:`~geoagent.batch.formats`: CSV and GeoJSON written from the journal.
- :mod:`~geoagent.batch.engines`: how photos are located (``local``: asyncio in one process).
- :mod:`~geoagent.batch.runner`: one run, tying them together.
"""

from geoagent.batch.formats import FORMATS, OutputPlan, plan_output
from geoagent.batch.inputs import BatchInput, BatchInputError, BatchItem
from geoagent.batch.journal import Journal

__all__ = ["FORMATS", "BatchInput", "BatchInputError", "BatchItem", "Journal", "OutputPlan", "plan_output"]
