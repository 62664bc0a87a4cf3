"""Loft: the CLI (composition root), configuration and the wire protocol."""
