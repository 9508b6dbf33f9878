"""The subcommands of `fcmae`, one module each, exposing build_parser() and run(cfg). Only
fcmae/cli.py imports them, and none imports another (tests/test_imports.py)."""
