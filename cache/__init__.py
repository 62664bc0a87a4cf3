"""The local replica: LMDB store, sealed chunks, write-back journal, sync services."""
