"""Metrics from probabilities (AUC with patient-bootstrap CI, calibration), plots, and the
out-of-fold report of a finished CV.  Imports core and artifacts."""
