"""Certificate sources (files watched, ACME, self-signed) and their storage (DESIGN.md layout)."""
