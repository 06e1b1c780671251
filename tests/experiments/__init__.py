"""Tests of gradsafe.experiments, one module per experiments module."""
