"""Argon: serverless PostgreSQL you run yourself."""

__version__ = "0.1.0"
