"""Subcommands of the `seqep` CLI that belong to the analog backend (one module per command)."""
