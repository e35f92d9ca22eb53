"""mmtk's RGB-D folder layouts: one file per layout, each a :class:`~mmtk.data.sources.folders.Layout` subclass
decorated with ``@register_layout``.

Importing this package registers them in :data:`DETECTION_ORDER` (the order they are asked, and listed in when
none matches); layouts of ``--plugin`` files come after. ``depth_units`` and ``frame_files`` are what several
layouts share. A new layout is one new file here (added to :data:`DETECTION_ORDER`) or a plugin file; see
``mmtk.data.sources.folders``.
"""

import importlib

DETECTION_ORDER = ("nyuv2_mat", "multimae", "bts_sync", "sparse_to_dense", "tum", "nyuv2_raw", "paired")
for _module in DETECTION_ORDER:
    importlib.import_module(f"{__name__}.{_module}")
