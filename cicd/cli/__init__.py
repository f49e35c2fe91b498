"""The `cicd` command: the root group (main.py), one module per command group, what the commands
share (context.py: --env, --json, the Settings in ctx.obj) and how they print (terminal.py).

Importing this package imports nothing else: cicd.cli.terminal is used without the commands."""
