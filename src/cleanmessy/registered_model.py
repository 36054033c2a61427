"""What MLflow runs to build the registered model (*models from code*: no pickles). evaluate logs
this file with the package as the model's code; loading the model runs it."""

from mlflow.models import set_model

from cleanmessy.pyfunc import PhotoClassifier

set_model(PhotoClassifier())
