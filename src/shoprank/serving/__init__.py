"""Serving the champion: scorer loaders for every backend (``scorers``), the ONNX / int8
export step (``export``) and the ranking API (``app``)."""
