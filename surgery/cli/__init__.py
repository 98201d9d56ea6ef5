"""The command line: one module per command, shared option groups declared once."""
