"""Command lines. One module per console script; heavy imports stay inside the commands so that --help is fast."""
