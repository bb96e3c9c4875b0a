"""The typed example runs for real (mypy --strict checks it in scripts/lint.sh)."""

from __future__ import annotations

from typing_example import main


def test_typed_example_runs() -> None:
    main()
