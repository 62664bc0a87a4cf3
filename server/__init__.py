"""The Loft server: a raw ASGI app on hypercorn's trio worker."""
