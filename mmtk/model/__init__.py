"""The model: MultiMAE and its parts (layers, decoders, heads, masking), the model registry and sizes."""
