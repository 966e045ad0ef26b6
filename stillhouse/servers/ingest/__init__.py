"""The ingest API: ``app`` (the Starlette app factory), ``metrics`` (Prometheus, multiprocess
aware) and ``server`` (``stillhouse serve``: options checked, one or several processes)."""
