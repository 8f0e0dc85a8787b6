"""The web page and the JSON APIs (native and OpenAI-compatible) over the generation code.

    python python3_distillation/distill_api_server_v2.py     # gunicorn on http://127.0.0.1:6006

The modules and how they fit (and why this package imports no Flask itself): docs/design/serving.md.
"""
