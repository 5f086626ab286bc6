"""What a run reads: image folders and lists, text files, webdataset tars, parquet tables and
clip-retrieval embedding folders, listed once into an item index.

:func:`load_input` (in :mod:`.load`) turns any input into an :class:`InputItems` (the run's
items, in :mod:`.items`); one module per kind of input reads it (:mod:`.folders`,
:mod:`.texts`, :mod:`.tars`, :mod:`.parquet`, :mod:`.features`, with the lazy rows of
embedding folders in :mod:`.feature_rows` and URL fetching in :mod:`.urls`). :mod:`.index`
stores the listed items for the other workers; :mod:`.decode` turns image items into tensors.
"""

from crossgap_fast.pipeline.inputs.decode import ImageDataset, collate_images, load_image, unreadable_image
from crossgap_fast.pipeline.inputs.feature_rows import FeatureRows
from crossgap_fast.pipeline.inputs.folders import IMAGE_EXTENSIONS
from crossgap_fast.pipeline.inputs.index import read_index, write_index
from crossgap_fast.pipeline.inputs.items import InputItems, ImageUrl, TarMember
from crossgap_fast.pipeline.inputs.load import load_input

__all__ = [
    "IMAGE_EXTENSIONS",
    "FeatureRows",
    "InputItems",
    "ImageDataset",
    "ImageUrl",
    "TarMember",
    "collate_images",
    "load_input",
    "load_image",
    "read_index",
    "unreadable_image",
    "write_index",
]
