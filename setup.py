"""Shim for tools that still call ``setup.py`` (Beam's ``--setup_file ./setup.py`` builds the
project's sdist with it to install it on Dataflow workers); the metadata is in pyproject.toml."""

from setuptools import setup

setup()
