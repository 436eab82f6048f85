"""The chat server (bin/serve), in the order a request goes through it:

  access_log.py  middleware: the request's id, its log line, its metrics
  guard.py       middleware: API keys, or local Host names only; JSON bodies only
  app.py         create_app: the FastAPI routes (each a few lines), error handlers, start-up
  protocol.py    request bodies -> ChatParams (pydantic), ApiError, every response and chunk body
  serving.py     Answer: one completion from ChatParams to the whole answer or its SSE events
  worker.py      Worker: the thread that steps the Engine (its public API only)
  metrics.py     the Prometheus metrics (/metrics)
"""
