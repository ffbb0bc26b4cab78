"""Every benchmark run under pytest says first what it runs on: the CPU, its vector extensions, and
the kernels the core chose (the per-bench reports add the paths their contenders took)."""

from __future__ import annotations

from membuilder._core import cpu_info
from real_texts import cpu_model


def pytest_report_header() -> list[str]:
    info = cpu_info()
    runs = ", ".join(info["exact_search_available"])
    kernels = f"membuilder exact search: {info['exact_search']} (this CPU runs: {runs}); re-scoring: {info['rescore']}"
    return [f"CPU: {cpu_model()}", kernels]
