# CZone build and test entry points.  Every artifact is cached outside the
# repo in $(CZONE_CACHE), keyed by a hash of its inputs; see README.md.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
CZONECTL := $(VENV)/bin/czonectl
PYTEST_ARGS ?=

.PHONY: all deps kernel kernel-stock qemu image demo test test-unit test-vm bench lint \
	kernel-tree kernel-export qemu-export

all: kernel qemu image

deps:
	scripts/deps.sh

kernel: deps
	scripts/build-kernel.sh

kernel-stock: kernel
	scripts/build-kernel-stock.sh

qemu: deps
	scripts/build-qemu.sh

image: kernel
	scripts/build-image.sh

demo: all
	scripts/demo.sh

test: all kernel-stock
	$(VENV)/bin/pytest -ra tests/unit tests/device tests/vm $(PYTEST_ARGS)

test-unit: deps
	$(VENV)/bin/pytest -ra tests/unit $(PYTEST_ARGS)

test-vm: all kernel-stock
	$(VENV)/bin/pytest -ra -m vm tests/vm $(PYTEST_ARGS)

bench: all kernel-stock
	$(PY) -m czone.bench $(if $(QUICK),--quick) $(BENCH)

lint: deps
	$(VENV)/bin/ruff check czone tests

# Kernel and QEMU development: the work trees live in the cache.
kernel-tree: deps
	scripts/dev-tree.sh kernel

kernel-export:
	scripts/dev-tree.sh kernel export

qemu-export:
	scripts/dev-tree.sh qemu export
