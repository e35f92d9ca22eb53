"""Modality adapters (one file per modality) and sensor readers."""
