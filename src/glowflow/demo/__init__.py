"""The interactive web demo (``glowflow demo CHECKPOINT``): :func:`server.create_app` builds the
FastAPI app, ``index.html`` is its page. Needs the ``demo`` extra (fastapi, uvicorn)."""

# The most a request may upload. Every request body is held in memory whole (twice over as base64
# JSON), and no image within the pixel limit (4096 x 4096) needs more than 64 MB even stored
# uncompressed as RGBA: a larger upload buys no picture, only memory an anonymous client can take.
# Here, not in server.py, so that the command line checks it without importing FastAPI.
MAX_UPLOAD_MB = 64
