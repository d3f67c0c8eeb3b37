"""Saliency maps (Grad-CAM family via pytorch-grad-cam, input-gradient saliency), their
localisation and faithfulness scores, figures, and the out-of-fold explanation run.
Imports core, artifacts, data and model."""
