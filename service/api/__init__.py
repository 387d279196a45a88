"""The HTTP layer: routes, middleware, and the mapping of domain errors to status codes."""
