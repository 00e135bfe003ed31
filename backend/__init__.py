"""The backend: Flask REST API and web pages over the job registry, served by gunicorn."""
