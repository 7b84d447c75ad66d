# emu-colo: every target does its own setup, so on a fresh machine `make demo` and
# `make test` are the only two commands a user needs.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
CHELPER := emu/cpu/_emuc.stamp
FIRMWARE_STAMP := firmware/build/.stamp
ENGINE_STAMP := build/engine/lib/inputs.sha256

.PHONY: all setup deps venv engine cffi pyc firmware test demo demo-linux bench soak lint clean linux

all: test

# Debian packages: the toolchain for firmware, the C helper and our libunicorn build, QEMU
# and SeaBIOS as the reference for differential tests and benchmarks, and the real tools
# the tests use beside a guest (mkfs.ext4/debugfs for disks, ip for tap devices in network
# namespaces, curl as an HTTP client).  Installed only when missing and when we can.
deps:
	@missing=""; \
	command -v gcc >/dev/null || missing="$$missing gcc"; \
	command -v as >/dev/null || missing="$$missing binutils"; \
	command -v cmake >/dev/null || missing="$$missing cmake"; \
	command -v patch >/dev/null || missing="$$missing patch"; \
	command -v qemu-system-x86_64 >/dev/null || missing="$$missing qemu-system-x86"; \
	[ -e /usr/share/seabios/bios.bin ] || missing="$$missing seabios"; \
	command -v mkfs.ext4 >/dev/null || missing="$$missing e2fsprogs"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v etcd >/dev/null || missing="$$missing etcd-server"; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	      || echo "warning: apt-get could not install$$missing"; \
	  else echo "note: missing$$missing (install them for firmware builds / QEMU comparisons)"; fi; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat  # a path in a .pth: pip's import hook costs every run 13 ms
	touch $@

venv: $(STAMP)

# libunicorn from the pinned source distribution with engine/unicorn/*.patch (see engine/README.md)
$(ENGINE_STAMP): engine/build.py $(wildcard engine/unicorn/*.patch) $(STAMP)
	$(PY) engine/build.py

engine: deps $(ENGINE_STAMP)

$(CHELPER): emu/cpu/cbuild.py emu/cpu/emuc.c emu/cpu/emuc.h $(STAMP)
	$(PY) -m emu.cpu.cbuild
	touch $@

# byte-compiled modules, so that no run compiles them (PYTHONDONTWRITEBYTECODE may be set)
pyc: $(STAMP)
	@$(PY) -m compileall -q emu machines colo frontend linux bench >/dev/null

cffi: $(CHELPER)

$(FIRMWARE_STAMP): $(wildcard firmware/*.S firmware/lib/* firmware/*.ld firmware/Makefile)
	$(MAKE) -C firmware
	touch $@

firmware: $(FIRMWARE_STAMP)

setup: deps venv engine cffi pyc firmware

test: setup linux
	$(PY) -m pytest

demo: setup
	$(PY) -m emu colo demo

demo-linux: setup linux
	$(PY) -m emu colo demo --guest linux

bench: setup
	$(PY) -m bench

soak: setup
	EMU_SOAK=1 $(PY) -m pytest -m soak -p no:cacheprovider

# Debian's 6.1 kernel and a busybox initramfs, fetched and built in ~/.cache/emu-colo/linux
linux: setup
	$(PY) -m linux.build

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf build firmware/build emu/cpu/_emuc* .pytest_cache
