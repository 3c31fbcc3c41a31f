"""The command-line interface: `app.py` assembles the commands, one module per command group."""
