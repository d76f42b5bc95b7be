"""A multi-tenant take on the FastAPI full-stack template's backend: users, items, login."""
