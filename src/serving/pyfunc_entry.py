"""Models-from-code entry of the registered pyfunc: MLflow executes this file to build the
model, so nothing is cloudpickled and a model loads under any later Python/cloudpickle."""
from mlflow.models import set_model

from src.serving.pyfunc_model import BoneHealthModel

set_model(BoneHealthModel())
