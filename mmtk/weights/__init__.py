"""Weights files: reading and writing checkpoints of mmtk, official MultiMAE, timm and MAE; integrity."""
