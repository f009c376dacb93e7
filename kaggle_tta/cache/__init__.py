"""The prediction store: one .npy per (member, view) under a content fingerprint.

Layout::

    <cache>/<member>/<fingerprint>/manifest.json     what the numbers depend on; per-view state, CRC-32
    <cache>/<member>/<fingerprint>/ids.json          row order: the test ids, as JSON
    <cache>/<member>/<fingerprint>/.lock             held by the run writing this entry
    <cache>/<member>/<fingerprint>/<view>.npy        complete predictions, [N, C]
    <cache>/<member>/<fingerprint>/<view>.npy.partial   being filled (an .npy memmap)
    <cache>/<member>/<fingerprint>/<view>.boxes.npy   detection: every image's boxes, [M, 6]
    <cache>/<member>/<fingerprint>/<view>.offsets.npy image i's rows are offsets[i]:offsets[i+1]
    <cache>/<member>/<fingerprint>/_image_size.npy    tasks that map back (segmentation, detection):
                                                       each image's decoded (H, W), [N, 2] int32
    <cache>/.digests/                                 memoized content hashes (see digest)

- ``entry``: :class:`CacheEntry` (write, commit, read with verification), listing;
- ``files``: atomic writes, preallocation, disk errors as one line, the ragged writer;
- ``digest``: content fingerprints of checkpoints, test images and factory sources;
- ``lock``: one writer per entry, across processes.
"""

from kaggle_tta.cache.digest import content_digest, files_digest
from kaggle_tta.cache.entry import FORMAT_VERSION, CacheEntry, DamagedView, list_entries, remove_entry, view_states
from kaggle_tta.cache.files import RAGGED_WIDTH, RaggedWriter, disk_error, writing
from kaggle_tta.cache.lock import locked

__all__ = [
    "FORMAT_VERSION",
    "RAGGED_WIDTH",
    "CacheEntry",
    "DamagedView",
    "RaggedWriter",
    "content_digest",
    "disk_error",
    "files_digest",
    "list_entries",
    "locked",
    "remove_entry",
    "view_states",
    "writing",
]
