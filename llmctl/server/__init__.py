"""The OpenAI-compatible HTTP service: Flask app factory, schemas, handlers, metrics, WSGI runner."""
