"""``python -m archiver {train,build}``: train models and build their archives."""

from archiver.cli import main

raise SystemExit(main())
