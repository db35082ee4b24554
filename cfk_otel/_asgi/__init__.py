"""The ASGI side: the middleware, route templates, and the one response writer for our endpoints."""
