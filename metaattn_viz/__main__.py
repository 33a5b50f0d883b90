"""`python -m metaattn_viz` is the `metaattn-viz` command."""

from metaattn_viz.cli import main

raise SystemExit(main())
