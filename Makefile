# CZone build and test entry points.  Every artifact is cached outside the
# repo in $(CZONE_CACHE), keyed by a hash of its inputs; see README.md.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
CZONECTL := $(VENV)/bin/czonectl
PYTEST_ARGS ?=
DEBUG_TESTS ?= tests/vm/test_czone_kernel.py tests/vm/test_czone_virtio.py \
	tests/vm/test_czone_meminit.py tests/vm/test_czone_hostile_host.py \
	tests/vm/test_upstream_selftests.py

.PHONY: all deps kernel kernel-stock kernel-debug qemu image demo test test-unit test-vm \
	test-debug test-meminit bench lint \
	kernel-tree kernel-export qemu-export

all: kernel qemu image

deps:
	scripts/deps.sh

kernel: deps
	scripts/build-kernel.sh

kernel-stock: kernel
	scripts/build-kernel-stock.sh

# Outside `make test` and CI's time: KASAN, lockdep, DEBUG_VM, DEBUG_LIST.
kernel-debug: kernel
	CZONE_KERNEL_FLAVOUR=debug scripts/build-kernel.sh

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

# The kernel and device VM tests on the debug kernel; every one checks dmesg.
test-debug: all kernel-debug
	CZONE_KERNEL_FLAVOUR=debug $(VENV)/bin/pytest -ra $(DEBUG_TESTS) $(PYTEST_ARGS)

# The kernel and device VM tests once per memory-init option (issue 9),
# every VM booted with it; outside `make test` and CI's time.
MEMINIT_OPTIONS ?= init_on_free=1 init_on_alloc=1 page_poison=1
MEMINIT_TESTS ?= tests/vm/test_czone_kernel.py tests/vm/test_czone_virtio.py \
	tests/vm/test_czone_hostile_host.py
test-meminit: all
	rc=0; for opt in $(MEMINIT_OPTIONS); do \
		echo "== $$opt"; \
		CZONE_TEST_APPEND=$$opt $(VENV)/bin/pytest -ra $(MEMINIT_TESTS) $(PYTEST_ARGS) || rc=1; \
	done; exit $$rc

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
