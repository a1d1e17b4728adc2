"""The FastAPI front end: NVCF's REST API, a thin Temporal client, and the invocation gateway."""
