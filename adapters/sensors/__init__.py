"""Sensor readers: ROS-style messages and bags, RGB-D folders."""
