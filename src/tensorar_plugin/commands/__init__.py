"""Subcommands of the `tensorar` console script (see `tensorar_plugin.cli`)."""
