"""``python -m membuilder.eval``: the same as ``membuilder eval``."""

from membuilder.eval.runner import main

raise SystemExit(main())
