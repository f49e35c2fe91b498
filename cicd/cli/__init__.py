"""The command line's parts: terminal output (tables, plain rows, JSON)."""
