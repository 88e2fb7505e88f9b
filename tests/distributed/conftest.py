"""Wall times of the distributed cases, printed in the terminal summary (CI logs show them without -s)."""

import pytest

_TIMINGS = pytest.StashKey[list]()


@pytest.fixture(scope="session")
def record_distributed_time(pytestconfig):
    """``record(label, seconds)``: adds one line to the end-of-session timing table."""
    rows = pytestconfig.stash.setdefault(_TIMINGS, [])

    def record(label: str, seconds: float) -> None:
        rows.append((label, seconds))

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = config.stash.get(_TIMINGS, [])
    if not rows:
        return
    terminalreporter.section("distributed wall times (seconds)")
    for label, seconds in rows:
        terminalreporter.write_line(f"{label:<48} {seconds:8.1f}")
    launches = sum(s for label, s in rows if label.startswith("launch "))
    terminalreporter.write_line(f"{'total of the launches':<48} {launches:8.1f}")
