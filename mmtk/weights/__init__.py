"""Weights: reading and writing checkpoints of mmtk, official MultiMAE and timm/MAE (one module per format, listed
in :mod:`mmtk.weights.sources`), the files and folders that hold them, the model they describe, their integrity."""
