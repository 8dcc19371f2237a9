"""Command-line front ends: ``python -m cli.train``, ... Each parses arguments and calls one library function."""
