"""Tests of gradsafe.bench, one module per bench module."""
