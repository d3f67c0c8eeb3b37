"""Radiographs in, arrays out: ingestion and validation, decoding, preprocessing, the outer folds
and the inner split, training augmentation and batches, and building the prepared store.
Imports src.core and src.artifacts."""
