"""Test package: lets conftest and the fixture builder import `tests.fixture_spec`."""
