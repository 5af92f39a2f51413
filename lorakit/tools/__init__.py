"""Tools around training: extract, merge, resize, convert, inspect. Each has a Python function (what tests
call) and a thin ``*_cli.py`` module registering its ``lorakit <command>``."""
