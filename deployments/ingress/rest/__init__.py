"""The REST transport: the FastAPI app, its routers, the hot routes, HTTP helpers."""
