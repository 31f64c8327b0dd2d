"""HTTP routes, one module per resource: `runs` (the REST API) and `web` (the dashboard's files)."""
