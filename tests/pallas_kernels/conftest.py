"""The `slow` marker: sweeps that a representative unmarked case already covers
(deselect them with `-m "not slow"`)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long sweep beside a representative unmarked case")
