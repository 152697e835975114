"""``python -m serveready.archiver {init,train,build}``."""

from .cli import main

raise SystemExit(main())
