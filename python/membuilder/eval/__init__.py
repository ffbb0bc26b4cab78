"""Benchmark evaluation: dataset loaders (:mod:`~membuilder.eval.datasets`), the runner
(:mod:`~membuilder.eval.runner`, the ``membuilder eval`` command) and the reports
(:mod:`~membuilder.eval.reports`)."""
