"""The web page and the JSON APIs (native and OpenAI-compatible) over the generation code.

    python python3_distillation/distill_api_server_v2.py     # gunicorn on http://127.0.0.1:6006

``app`` (the factory, the page, the probes, the Host and Content-Type guards) · ``api`` (native and OpenAI
routes and their request side: rows, the waiting line, answers) / ``proxy`` (a backend's) · ``schemas`` (one
request schema per route) · ``batching`` (the continuous-batching worker) · ``state`` (models, health) ·
``errors`` · ``metrics`` · ``settings`` · ``wsgi`` / ``gunicorn_conf`` / ``cli`` (how it is run). Nothing
here imports Flask at package import, so ``schemas`` stays light for the command line.
"""
