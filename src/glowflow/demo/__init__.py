"""The interactive web demo (``glowflow demo CHECKPOINT``): :func:`server.create_app` builds the
FastAPI app, ``index.html`` is its page. Needs the ``demo`` extra (fastapi, uvicorn)."""
