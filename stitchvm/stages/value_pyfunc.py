"""The value model's pyfunc as an MLflow "model from code" (tracking.log_value_model logs this file).

MLflow copies this file into the logged model and runs it when the model is loaded, instead of unpickling a Python
object: loading executes reviewed, importable code (stitchvm's) and no pickle. It needs stitchvm installed, which
the model's requirements pin anyway.
"""
from mlflow.models import set_model

from stitchvm.stages.tracking import ValueModelPyfunc

set_model(ValueModelPyfunc())
