"""Students as MLflow pyfunc models, one module per family: ``spec_*`` builds the
``pipelines.mlmodel.PyFunc`` a student stage returns from ``mlflow_model``, and the
module's ``_load_pyfunc(path)`` (MLflow's ``loader_module`` contract) rebuilds the model
from the folder's own safetensors files with the library's ``from_pretrained``."""
