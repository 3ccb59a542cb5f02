"""Serving: an OpenAI-compatible HTTP server with continuous batching, a hybrid router and a chat page."""
