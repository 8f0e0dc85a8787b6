"""The web page and the JSON APIs (native and OpenAI-compatible) over the generation code.

    python python3_distillation/distill_api_server_v2.py     # gunicorn on http://127.0.0.1:6006

``app`` (the factory) · ``openai_api`` / ``native_api`` / ``page`` / ``probes`` / ``proxy`` (one
blueprint each) · ``schemas`` (one request schema per route) · ``admission`` (request side: rows,
the waiting line, answers) · ``batching`` (the continuous-batching worker) · ``state`` (models,
health) · ``guards`` (Host, Content-Type) · ``metrics`` · ``settings`` · ``wsgi`` / ``gunicorn_conf``
/ ``cli`` (how it is run). Nothing here imports Flask at package import, so ``schemas`` stays light
for the command line.
"""
