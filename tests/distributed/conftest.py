"""Wall times and observed differences of the distributed cases, printed in the terminal summary (CI logs
show them without -s)."""

import pytest

_TIMINGS = pytest.StashKey[list]()
_DIFFERENCES = pytest.StashKey[list]()


@pytest.fixture(scope="session")
def record_distributed_time(pytestconfig):
    """``record(label, seconds)``: one line of the end-of-session timing table."""
    rows = pytestconfig.stash.setdefault(_TIMINGS, [])

    def record(label: str, seconds: float) -> None:
        rows.append((label, seconds))

    return record


@pytest.fixture(scope="session")
def record_layout_difference(pytestconfig):
    """``record(layout, loss_rel, weight_abs, bias_abs)``: the largest differences a layout showed."""
    rows = pytestconfig.stash.setdefault(_DIFFERENCES, [])

    def record(layout: str, loss_rel: float, weight_abs: float, bias_abs: float) -> None:
        rows.append((layout, loss_rel, weight_abs, bias_abs))

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    timings = config.stash.get(_TIMINGS, [])
    if timings:
        terminalreporter.section("distributed wall times (seconds)")
        for label, seconds in timings:
            terminalreporter.write_line(f"{label:<52} {seconds:8.1f}")
        total = sum(s for label, s in timings if not label.startswith(" "))
        terminalreporter.write_line(f"{'total distributed time':<52} {total:8.1f}")
    differences = config.stash.get(_DIFFERENCES, [])
    if differences:
        terminalreporter.section("layout vs single process: largest differences")
        terminalreporter.write_line(f"{'layout':<22} {'loss (rel)':>12} {'weights (abs)':>14} {'expert_bias':>12}")
        for layout, loss_rel, weight_abs, bias_abs in differences:
            terminalreporter.write_line(f"{layout:<22} {loss_rel:12.2e} {weight_abs:14.2e} {bias_abs:12.2e}")
