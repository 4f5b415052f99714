"""The HTTP API: one module per endpoint (`routes.py` assembles them), plus errors, auth, schemas
and what routes share. Importing the package imports no route, so that the engine can use
`api.errors` without pulling in the routes that use the engine."""
