"""The gpu tier is a package so that its conftest is not imported as `conftest` (tests/conftest.py is)."""
