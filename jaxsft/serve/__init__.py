"""The chat server (bin/serve), in the order a request goes through it:

  app.py         create_app: the FastAPI routes (each a few lines), error handlers, start-up
  protocol.py    request bodies -> ChatParams (pydantic), ApiError, every response and chunk body
  serving.py     Answer: one completion from ChatParams to the whole answer or its SSE events
  worker.py      Worker: the thread that steps the Engine (its public API only)
  access_log.py  one log line per request
"""
