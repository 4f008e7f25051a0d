"""Sinks: what the app sees — the local HTTP API (TCP + Unix socket), files, change hooks.

    server.ApiServer / serve_api   uvicorn in our event loop: API listeners + metrics port
    api.ApiApp, sse.WatchStream    the SPEC §4 API as a raw ASGI app
    files.FileSink                 atomically swapped file set under output_dir
    hooks.ChangeHooks              debounced exec / signal / webhook after changes

Every sink reads immutable store snapshots; none writes to the store.
"""
