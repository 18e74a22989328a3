"""Tensor parallel: sharded layers (``parallel``), plans (``plan``), vocabulary-parallel loss (``vocab``), dropout RNG regions (``rng_tracker``)."""
