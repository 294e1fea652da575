"""Evaluation: the OpenAI-compatible client, the managed model server, and the OCR engines."""
