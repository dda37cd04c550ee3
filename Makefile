# Two commands do everything on a fresh Debian machine:
#   make demo   deps, build, generate data, run the server and five agencies, print winners
#   make test   deps, build, every test
SHELL := /bin/bash
BUILD_DIR ?= build
ASAN_BUILD_DIR ?= build-asan
BUILD_TYPE ?= Release
JOBS ?= $(shell nproc)
AGENCIES ?= 5

# Debian packages the build and the tests need (see README.md for why each).
DEPS := build-essential cmake ninja-build pkg-config git \
        liburing-dev libmimalloc-dev libgtest-dev libgmock-dev libbenchmark-dev \
        libyaml-cpp-dev libinih-dev libspdlog-dev libfmt-dev libcli11-dev \
        python3 python3-pytest curl

.PHONY: all deps build test test-unit test-integration asan demo clean format help

all: build

help:
	@echo "make demo    - install deps, build, run a 5-agency lottery end to end"
	@echo "make test    - install deps, build, run every test (ctest)"
	@echo "make build   - configure and build into $(BUILD_DIR)/ (binaries in $(BUILD_DIR)/bin)"
	@echo "make asan    - build with ASan+UBSan into $(ASAN_BUILD_DIR)/ and run the tests"
	@echo "make deps    - install the Debian packages (apt-get as root, else prints the command)"

deps:
	@missing=""; \
	for p in $(DEPS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then echo "deps: all present"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
	  echo "deps: installing$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else \
	  echo "deps: missing$$missing"; \
	  echo "run:  sudo apt-get update && sudo apt-get install -y$$missing"; \
	  exit 1; \
	fi

$(BUILD_DIR)/build.ninja:
	cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=$(BUILD_TYPE)

build: deps $(BUILD_DIR)/build.ninja
	cmake --build $(BUILD_DIR) -j $(JOBS)

test: build
	cd $(BUILD_DIR) && ctest --output-on-failure -j 1 --timeout 900

test-unit: build
	cd $(BUILD_DIR) && ctest --output-on-failure -L unit

test-integration: build
	cd $(BUILD_DIR) && ctest --output-on-failure -L integration

asan: deps
	cmake -S . -B $(ASAN_BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLOTTERY_SANITIZE=ON -DLOTTERY_BUILD_BENCH=OFF
	cmake --build $(ASAN_BUILD_DIR) -j $(JOBS)
	cd $(ASAN_BUILD_DIR) && ctest --output-on-failure --timeout 900

demo: build
	AGENCIES=$(AGENCIES) BIN_DIR=$(BUILD_DIR)/bin tools/demo.sh

format:
	clang-format -i $$(git ls-files '*.cpp' '*.hpp')

clean:
	rm -rf $(BUILD_DIR) $(ASAN_BUILD_DIR) demo-run
