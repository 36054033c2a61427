"""Serving: the Gradio app, the batch predict CLI, Grad-CAM. Models come from the MLflow registry."""
