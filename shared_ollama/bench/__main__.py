"""``python -m shared_ollama.bench``: see ``cli.py`` (run, compare, report)."""

from .cli import main

raise SystemExit(main())
