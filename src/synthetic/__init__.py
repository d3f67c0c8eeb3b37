"""The embedded default dataset: a panoramic phantom whose class signal sits in the inferior
mandibular cortex (anatomy, generator, pixel measurement, example figure).  Imports src.core and
src.artifacts (the data-folder layout it writes)."""
