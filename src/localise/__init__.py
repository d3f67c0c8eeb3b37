"""Finding the mandibular cortex box on a whole radiograph: the `locate` stage's parts."""
