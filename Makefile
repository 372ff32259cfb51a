# gntdma: the two commands are `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# What `gntdma run` drives (the default guest's NIC: namespaces and ping).
RUN_DEBS := iproute2 iputils-ping
DEBS := libxen-dev xenstore-utils gcc qemu-utils libnbd-bin fio e2fsprogs fuse3 iproute2 iputils-ping iperf3

.PHONY: run test venv venv-test debs debs-run xen-utils lint typecheck pytest clean

run: debs-run venv
	$(BIN)/gntdma run

test: debs xen-utils venv-test lint typecheck pytest

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[plots]'
	touch $@

$(VENV)/.test: $(VENV)/.base pyproject.toml
	$(BIN)/python -m pip install -q -e '.[test,plots,dask]'
	touch $@

venv: $(VENV)/.base

venv-test: $(VENV)/.test

# Debian packages the suite drives or compiles against; installed only when missing.
debs:
	@missing=""; for p in $(DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

debs-run:
	@$(MAKE) --no-print-directory debs DEBS="$(RUN_DEBS)"

# Xen's own xenstore test program (test-xenstore), from Debian's xen-utils-4.17,
# downloaded and unpacked under .cache/ (never installed: it pulls in systemd
# and udev). tests/xenstored/test_xs_test_xenstore.py runs it.
XEN_UTILS := .cache/xen-utils-4.17
TEST_XENSTORE := $(XEN_UTILS)/usr/lib/xen-4.17/bin/test-xenstore

xen-utils: $(TEST_XENSTORE)

$(TEST_XENSTORE):
	rm -rf .cache/debs $(XEN_UTILS)
	mkdir -p .cache/debs
	cd .cache/debs && apt-get download -q xen-utils-4.17
	dpkg -x .cache/debs/xen-utils-4.17_*.deb $(XEN_UTILS)
	test -x $@ && touch $@

lint:
	$(BIN)/ruff check src tests benchmarks

typecheck:
	$(BIN)/mypy src

pytest:
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
