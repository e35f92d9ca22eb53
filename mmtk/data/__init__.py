"""The mmtk HDF5 dataset format: conversion, inspection and loading.

Public API:
    FORMAT_VERSION, H5Writer            -- the format and its atomic writer (reusable by any converter)
    H5Dataset                           -- PyTorch Dataset over a split, prepared as the model expects
    read_info, format_info              -- summaries for `mmtk info` and the engine
    dataset_files, write_index          -- shard folders: their files, their index (`mmtk index`)
    convert_rgbd, convert_rosbag, convert_images -- the `mmtk convert` back-ends
    build_demo_file                     -- a small training file from the samples shipped with the repo
"""

from mmtk.data.convert import (ConvertResult, build_demo_file, convert_images, convert_rgbd, convert_rosbag, parse_size,
                               samples_dir, write_frames)
from mmtk.data.dataset import H5Dataset
from mmtk.data.format import FORMAT_VERSION, H5Writer, open_mmtk_file
from mmtk.data.info import format_info, read_info
from mmtk.data.shards import ShardedDataset, dataset_files, write_index

__all__ = ["FORMAT_VERSION", "H5Writer", "H5Dataset", "open_mmtk_file", "read_info", "format_info",
           "convert_rgbd", "convert_rosbag", "convert_images", "write_frames", "parse_size", "ConvertResult",
           "build_demo_file", "samples_dir", "ShardedDataset", "dataset_files", "write_index"]

