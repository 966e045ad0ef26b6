"""Every server stillhouse runs, each in its own package as an app factory that takes values:

- ``ingest``: the live-sample API (``stillhouse serve``) and its Prometheus metrics;
- ``teacher``: the local OpenAI-compatible teacher (``stillhouse teacher serve``), its
  backends, fault injection and hosted-provider limits, and ``process`` to run it as a child;
- ``router``: a trained student with its teacher fallback (``stillhouse route serve``),
  answering in the teacher's protocol;
- ``serving``: uvicorn with read deadlines and connection caps, used by every server;
- ``requests``: the bearer tokens, bounded JSON bodies and error shape the APIs share.

A new server (the dashboard) gets a package here beside them.
"""
