"""Samples and image completions from a run."""
