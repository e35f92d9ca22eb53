"""ROS1 and ROS2 bags as a data source (read with ``rosbags``, no ROS install needed), one module per topic.

- ``bag``: opening a bag, its topics, header stamps, decoding a message.
- ``images``: Image/CompressedImage messages to colour, depth (metres) or an extra stream's samples.
- ``camera_info``: CameraInfo messages to intrinsics, the nearest usable one per frame.
- ``clouds``: PointCloud2 messages to point clouds, moved into the colour camera's frame and projected to depth.
- ``tf``: the bag's /tf_static and /tf transform tree.
- ``pairer``: pairing the streams by stamp in one pass.
- ``source``: the bag as an :class:`~mmtk.data.sources.frame.RgbdSource` (what `mmtk convert` and `mmtk predict`
  read).
"""
