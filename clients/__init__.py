"""Client-side code: imports only the generated stubs (recserve.v1), never server."""
