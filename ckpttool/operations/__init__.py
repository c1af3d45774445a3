"""One module per operation; each takes paths and options and returns plain data for the CLI to render."""
