"""``python -m llama_sessions`` runs the command line interface."""

from .cli import main

raise SystemExit(main())
