"""The web page (``/``): a playground that streams /v1/completions, in 中文 or English.

    python python3_distillation/distill_api_server_v2.py   # then open http://127.0.0.1:6006

The page's strings live in ``static/i18n.json`` (one entry per string, both languages). The server
renders the page in the language the browser's ``Accept-Language`` prefers; the page's toggle
switches it (the choice is remembered), with ``navigator.language`` as the default. Generated text
is never translated.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from flask import Blueprint, current_app, render_template, request

bp = Blueprint("page", __name__)

I18N_FILE = Path(__file__).resolve().parent.parent / "static" / "i18n.json"
LANGUAGES = ("en", "zh")


@cache
def strings() -> dict[str, dict[str, str]]:
    """``{key: {"en": ..., "zh": ...}}``."""
    return json.loads(I18N_FILE.read_text(encoding="utf-8"))


@bp.get("/")
def index() -> str:
    st = current_app.extensions["distill"]
    lang = request.accept_languages.best_match(LANGUAGES, default="en")
    table = strings()
    # "<" escaped: the table sits inside a <script> block.
    i18n = json.dumps(table, ensure_ascii=False).replace("<", "\\u003c")
    return render_template("index.html", models=list(st.info.values()), default=st.default, lang=lang,
                           t=lambda key: table[key][lang], i18n=i18n, backend=bool(st.config.backend_url))
