"""MLflow plugin that mirrors every write from Databricks to Azure Machine Learning."""
