"""The mmtk HDF5 dataset format: conversion, inspection and loading."""
