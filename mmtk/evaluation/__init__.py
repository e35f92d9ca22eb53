"""Evaluation: metrics pooled over a split, the evaluation protocols, and the evaluation loop."""
