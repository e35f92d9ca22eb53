"""mmtk: MultiMAE-style multi-modal multi-task masked autoencoders for RGB-D robotics data."""

__version__ = "0.1.0"
