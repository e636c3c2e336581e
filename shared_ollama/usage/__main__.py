"""``python -m shared_ollama.usage``: the same command as ``python -m shared_ollama usage``."""

import sys

from .cli import usage_main

sys.exit(usage_main())
