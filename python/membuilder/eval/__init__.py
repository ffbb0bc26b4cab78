"""Benchmark evaluation (the dataset loaders are :mod:`~membuilder.datasets`): the runner
(:mod:`~membuilder.eval.runner`, the ``membuilder eval`` command) and the reports
(:mod:`~membuilder.eval.reports`)."""
