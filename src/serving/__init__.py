"""The model users get: the ensemble pyfunc and its models-from-code entry, the model card,
registering a CV in the MLflow registry, the promotion gate, and predicting raw files.
Imports core, artifacts, data, model, explain."""
