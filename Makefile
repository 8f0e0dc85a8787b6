# GPT-2 distillation v3 — the verbs a newcomer looks for.
#   make run     set up, build offline assets, train the teacher, distil v2 (+ CE baseline), int8 v2, report
#   make test    the test-suite (CPU, tiny models)
#   make lock    re-resolve requirements_v3_lock.txt to the newest allowed versions (then make test)
#   make bench   side-by-side benchmarks → benchmarks/results.md
#   make experiments   pruning, teacher-generated data, the loss family, at equal steps → reports/experiments.md
#   make serve   web page + API on http://127.0.0.1:6006 (v2; MODEL=v2_int8 or a folder for another)
#   make gpu-check   the CUDA path on one GPU (< 8 min): pytest -m cuda + real-shape speed → reports/gpu_check/
#   make export-v2   v2 for other engines: GGUF q8_0 (llama.cpp, Ollama) + ONNX with a KV cache (ONNX Runtime)
#   make screenshot   refresh sample_images/distillation.png from the trained v2 student

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

# Offline by default: the embedded pipeline needs no hub, and a blocked hub costs ~48 s per lookup.
export HF_HUB_OFFLINE ?= 1
# Large logits tensors are re-mapped and page-faulted every step with glibc's default malloc;
# huge pages made the KL forward+backward 2.7x faster on this CPU (no install needed).
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
export TOKENIZERS_PARALLELISM ?= false
# tcmalloc under the stages that train or measure (python3_distillation/allocator.py): the same
# weights bit for bit, 1.8x the teacher's steps per second here; fetched once into data/ without
# installing anything; glibc (with the huge pages above) where it cannot be had.
MALLOC = LD_PRELOAD="$$($(PY) -m python3_distillation.allocator)"

.PHONY: run setup lock assets teacher distill-v2 distill-v2-ce distill-v1 distill-v2-narrow quantize-v2 export-v2 report experiments test bench serve serve-prod screenshot lint clean gpu-check

run: setup assets teacher distill-v2 distill-v2-ce quantize-v2 report

setup: $(STAMP)

# What gets installed is the lock (requirements_v3_lock.txt: exact versions + hashes, written by
# `make lock`), never whatever the ranges in pyproject.toml resolve to on the day. Torch stays out
# of the lock: the pinned CPU wheel here, the base image's CUDA build in Docker. The venv is rebuilt
# from scratch when the lock changes, so `pip freeze` is the lock (torch aside) and nothing lingers.
$(STAMP): pyproject.toml requirements_v3_lock.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet --no-deps --require-hashes -r requirements_v3_lock.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $@

# Re-resolve to the newest versions pyproject.toml allows, on purpose; `make test` on the new lock
# is how an upgrade is accepted. Also rewrites requirements_v3_backend.txt (the images' subset).
lock: setup
	$(PY) scripts/lock.py --torch "$(TORCH)"

# The corpus comes from a Debian package fetched with `apt-get download`; as root on a fresh
# machine the package lists may be empty, so refresh them once.
assets: setup
	@if [ "$$(id -u)" = 0 ] && ! apt-cache show r-cran-janeaustenr >/dev/null 2>&1; then apt-get update -qq; fi
	$(PY) -m python3_distillation assets

teacher: setup
	$(MALLOC) $(PY) -m python3_distillation teacher --config teacher --resume

distill-v2: setup
	$(MALLOC) $(PY) python3_distillation/distill_training_v2.py --resume

distill-v2-ce: setup
	$(MALLOC) $(PY) -m python3_distillation distill --config v2_ce --resume

distill-v1: setup
	$(MALLOC) $(PY) python3_distillation/distill_training.py --resume

# Half the teacher's width (about a third of its parameters); the report adds it when present.
distill-v2-narrow: setup
	$(MALLOC) $(PY) -m python3_distillation distill --config v2_narrow --resume

# int8 copy of the v2 student (no training: seconds) → python3_distillation/gpt2_student_v2_int8
quantize-v2: setup
	$(MALLOC) $(PY) -m python3_distillation quantize python3_distillation/gpt2_student_v2

# v2 for other engines (seconds): python3_distillation/gpt2_student_v2-q8_0.gguf and gpt2_student_v2_onnx/
export-v2: setup
	$(PY) -m python3_distillation export python3_distillation/gpt2_student_v2 --to gguf --type q8_0
	$(PY) -m python3_distillation export python3_distillation/gpt2_student_v2 --to onnx

report: setup
	$(MALLOC) $(PY) -m python3_distillation report

# The CUDA path proved on one GPU in under 8 minutes (scripts/gpu_check.py): pytest -m cuda, then a
# real-shape distillation (12 x 768 -> 6 x 768, 50 steps of 8 x 1,024 tokens: tokens/s, MFU, peak
# memory) and decode speed at batch 1 and 32 → reports/gpu_check/gpu_check.{json,log}.
# DRY_RUN=1: the same script on CPU with tiny shapes, the same JSON keys (make test runs it).
gpu-check: setup
	$(PY) scripts/gpu_check.py $(if $(DRY_RUN),--dry-run)

# Every distillation recipe compared at equal steps (configs/exp_*.yaml) on the trained teacher
# (`make run` or `make teacher` first); resumable: run it again after a kill.
experiments: setup assets
	$(MALLOC) $(PY) -m python3_distillation.experiments

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/run.py

# Any model by folder or name: make serve MODEL=v2_int8 (or teacher, v2_narrow, a/folder)
serve: setup
	$(PY) python3_distillation/distill_api_server_v2.py $(if $(MODEL),--model $(MODEL))

serve-prod: setup
	DISTILL_MODEL_DIR=python3_distillation/gpt2_student_v2 $(VENV)/bin/gunicorn --bind 127.0.0.1:6006 \
	  --config python:python3_distillation.serving.gunicorn_conf python3_distillation.serving.wsgi:app

# The README's picture: the page serving the trained v2 student, in headless Chromium.
screenshot: setup
	@test -f python3_distillation/gpt2_student_v2/config.json || \
	  { echo "make screenshot: no trained v2 student in python3_distillation/gpt2_student_v2 (run make run first)" >&2; exit 1; }
	DISTILL_SCREENSHOT=$(CURDIR)/sample_images/distillation.png $(PY) -m pytest -q \
	  tests/serving/test_page_browser.py -k test_screenshot_of_the_trained_v2

lint: setup
	$(VENV)/bin/hadolint Dockerfile_v3.1_backend Dockerfile_v3.2_backend

clean:
	rm -rf runs reports .pytest_cache
