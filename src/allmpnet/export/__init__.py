"""Exporting the encoder to other runtimes."""
