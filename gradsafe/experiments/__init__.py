"""Demonstrations and studies run by ``gradsafe demo``."""
