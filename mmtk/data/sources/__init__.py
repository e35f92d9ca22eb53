"""Data sources: where frames come from before `mmtk convert` writes them (one file per source family).

- ``frame``: :class:`Frame` (what every source yields), :class:`ConvertOptions`, :class:`RgbdSource`; ``pairing``,
  ``image_files``, ``depth_encoding``, ``intrinsics``, ``nyuv2_meta``: what several sources read with.
- ``folders``: the RGB-D folder layout interface, its registry and detection; ``layouts/``: one file per layout
  (NYUv2 .mat, MultiMAE, BTS sync, sparse-to-dense, TUM, NYUv2 raw dumps, paired folders).
- ``kinect_nyu``: registration of raw Kinect v1 frames with the NYU Depth v2 calibration.
- ``ros``: ROS1/ROS2 bags (images, CameraInfo, PointCloud2, their transform tree), a package split by topic.
- ``images``: folders of RGB images alone.
- ``mmtk_files``: frames of mmtk dataset files (what `mmtk predict --data` reads).
"""
