"""Data sources: where frames come from before `mmtk convert` writes them (one file per source family).

- ``base``: :class:`Frame` (what every source yields), :class:`RgbdSource`, time pairing, image decoding.
- ``nyuv2``: the NYUv2 labeled release (.mat).
- ``folders``: RGB-D folder layouts (MultiMAE, BTS sync, sparse-to-dense, TUM, NYUv2 raw dumps, paired folders).
- ``kinect_nyu``: registration of raw Kinect v1 frames with the NYU Depth v2 calibration.
- ``ros``: ROS1/ROS2 bags (images, CameraInfo, PointCloud2, their transform tree), a package split by topic.
- ``images``: folders of RGB images alone.
- ``mmtk_files``: frames of mmtk dataset files (what `mmtk predict --data` reads).
"""
