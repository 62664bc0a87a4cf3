"""The seam to storage: a narrow contract implemented by the HTTP client of our server."""
