# Every target does its own set-up first: a fresh Debian 12 machine (as root)
# needs nothing but `make demo` or `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# python3-venv and python3-dev: a clean Debian 12 has neither the venv's pip nor the headers cffi builds ext/ with.
# fio and postgresql-15: the torture test's second workload and its database (tests/torture).
APT_PACKAGES := python3 python3-venv python3-dev fuse3 libfuse3-dev pkg-config gcc e2fsprogs util-linux iproute2 procps psmisc haproxy fio postgresql-15
# Only for the tests: `vagrant validate` of vagrant/Vagrantfile (no VM is started), shellcheck of vagrant/provision.sh.
TEST_APT_PACKAGES := vagrant shellcheck
BENCH_APT_PACKAGES := rsync keepalived

.PHONY: all setup demo test unit lab torture bench clean

all: test

# apt packages are installed only when one is missing, so a warm machine
# does not touch the network.
.stamp-apt: Makefile
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@touch $@

.stamp-venv: pyproject.toml setup.py $(wildcard ext/*.c ext/*.h ext/*.py) .stamp-apt
	@# pip, not python: a venv whose creation failed (no ensurepip) has a python and no pip.
	@test -x $(VENV)/bin/pip || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); } || { rm -rf $(VENV); exit 1; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

setup: .stamp-venv

demo: setup
	$(PY) -m mirrord_cli.demo

.stamp-test-apt: .stamp-apt
	@missing=""; for p in $(TEST_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi
	@touch $@

unit: setup .stamp-test-apt
	$(PY) -m pytest -q tests/unit

lab: setup
	$(PY) -m pytest -q tests/lab

# The torture test runs short here (5 cycles, 2 PostgreSQL failovers); `make torture` is the long run.
test: setup .stamp-test-apt
	$(PY) -m pytest -q -ra tests/unit tests/lab tests/torture

# make torture [CYCLES=50] [SEED=n] [PG_FAILOVERS=6]: random faults under load; the report lands in
# torture-report.json (docs/reliability.md records the last long run). A failure names its SEED.
CYCLES ?= 50
SEED ?=
PG_FAILOVERS ?= 6
torture: setup
	TORTURE_CYCLES=$(CYCLES) TORTURE_SEED=$(SEED) TORTURE_PG_FAILOVERS=$(PG_FAILOVERS) \
	TORTURE_REPORT=$(CURDIR)/torture-report.json \
	$(PY) -m pytest -q -s -ra -p no:cacheprovider -o timeout=0 tests/torture

.stamp-bench-apt: .stamp-apt
	@missing=""; for p in $(BENCH_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi
	@touch $@

bench: setup .stamp-bench-apt
	$(PY) -m pytest -q tests/bench --benchmark-only -p no:cacheprovider

clean:
	rm -rf $(VENV) build *.egg-info .stamp-* mirrord/_native*.so mirrord/_native.c
