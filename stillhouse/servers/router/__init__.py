"""The router: ``app`` (the Starlette app over a :class:`stillhouse.router.Router`) and
``server`` (``stillhouse route serve``)."""
