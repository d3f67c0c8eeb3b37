"""Finding the mandibular cortex box on a whole radiograph: the locate stage's parts, the finder
predict and the served model use, and the whole chain's figures evaluate reports.  Imports core,
artifacts, data, evaluation (metrics), model (the LR schedule, checkpoints for the chain) and
synthetic (the unseen phantom)."""
