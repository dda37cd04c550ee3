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
        python3 python3-pytest curl clang libclang-rt-14-dev libssl-dev
FUZZ_BUILD_DIR ?= build-fuzz
FUZZ_SECONDS ?= 20

.PHONY: all deps build test test-unit test-integration asan fuzz demo clean format help

all: build

help:
	@echo "make demo    - install deps, build, run a 5-agency lottery end to end"
	@echo "make test    - install deps, build, run every test (ctest), the fuzzers, and every test under ASan+UBSan"
	@echo "make build   - configure and build into $(BUILD_DIR)/ (binaries in $(BUILD_DIR)/bin)"
	@echo "make asan    - build with ASan+UBSan into $(ASAN_BUILD_DIR)/ and run the tests"
	@echo "make fuzz    - libFuzzer targets (clang, ASan+UBSan): replay the corpora, fuzz each FUZZ_SECONDS"
	@echo "make bench-idle - server memory per idle connection (10,000 of them) and against bets stored"
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
	$(MAKE) --no-print-directory fuzz
	$(MAKE) --no-print-directory asan

# libFuzzer targets under ASan+UBSan: replay the seed corpus, then fuzz each
# target for FUZZ_SECONDS (docs/SECURITY.md tells how to run them longer).
fuzz: deps
	CC=clang CXX=clang++ cmake -S . -B $(FUZZ_BUILD_DIR) -G Ninja -DFUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DFUZZ_SECONDS=$(FUZZ_SECONDS) >/dev/null
	cmake --build $(FUZZ_BUILD_DIR) -j $(JOBS)
	cd $(FUZZ_BUILD_DIR) && ctest --output-on-failure -L fuzz

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
	rm -rf $(BUILD_DIR) $(ASAN_BUILD_DIR) $(FUZZ_BUILD_DIR) demo-run

# ---------------------------------------------------------------- deployment
# Docker images and a compose deployment of the server and $(AGENCIES) agency
# clients (README.md "Docker"); a bare-metal install with systemd (README.md
# "Bare metal"). Names avoid COMPOSE_FILE/COMPOSE_PROJECT_NAME, which compose
# itself reads from the environment.
DOCKER ?= docker
# Compose v2 when the plugin is there, else the legacy docker-compose (1.29).
COMPOSE ?= $(shell $(DOCKER) compose version >/dev/null 2>&1 && echo "$(DOCKER) compose" || echo docker-compose)
BASE_IMAGE ?= debian:bookworm-slim
SERVER_IMAGE ?= lottery-server:latest
CLIENT_IMAGE ?= lottery-client:latest
COMPOSE_YAML ?= docker/docker-compose.generated.yaml
COMPOSE_PROJECT ?= lottery
AGENCY_DATA_DIR ?= .data
# TLS keys of the compose deployment (docker/generate-keys.sh); TLS=off for plaintext.
KEYS_DIR ?= .keys
TLS ?= on
DATAGEN_ARGS ?= --bets 10000 --seed 2026
# Seconds from SIGTERM to SIGKILL; the server needs at most its
# --shutdown-grace-ms (5 s) plus the store sync.
STOP_TIMEOUT ?= 20
DOCKER_ENV = DOCKER="$(DOCKER)" COMPOSE="$(COMPOSE)" COMPOSE_YAML="$(COMPOSE_YAML)" \
             COMPOSE_PROJECT="$(COMPOSE_PROJECT)" STOP_TIMEOUT="$(STOP_TIMEOUT)" \
             SERVER_IMAGE="$(SERVER_IMAGE)" CLIENT_IMAGE="$(CLIENT_IMAGE)"

.PHONY: docker-base docker-image docker-compose-file docker-compose-up docker-compose-logs \
        docker-compose-down test-docker install test-install

# The base image, built locally with debootstrap when no registry answers.
docker-base:
	$(DOCKER_ENV) docker/build-base-image.sh $(BASE_IMAGE)

# One compile: the build stage is tagged $(BUILD_IMAGE) and the server and
# client builds reuse it from the cache; older, untagged build stages are pruned.
BUILD_IMAGE ?= lottery-build:latest
DOCKER_BUILD = $(DOCKER) build -f docker/Dockerfile --build-arg BASE_IMAGE=$(BASE_IMAGE)
docker-image: docker-base
	$(DOCKER_BUILD) --target build -t $(BUILD_IMAGE) .
	$(DOCKER_BUILD) --target server -t $(SERVER_IMAGE) .
	$(DOCKER_BUILD) --target client -t $(CLIENT_IMAGE) .
	$(DOCKER) image prune -f --filter label=lottery.stage=build >/dev/null
	@$(DOCKER) image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^($(SERVER_IMAGE)|$(CLIENT_IMAGE)) '

docker-compose-file:
	$(DOCKER_ENV) LOTTERY_DATA_DIR="$(AGENCY_DATA_DIR)" STOP_GRACE_PERIOD="$(STOP_TIMEOUT)" \
	  LOTTERY_KEYS_DIR="$(KEYS_DIR)" LOTTERY_TLS="$(TLS)" docker/generate-compose.sh $(COMPOSE_YAML) $(AGENCIES)

docker-compose-up: docker-image
	$(DOCKER_ENV) docker/generate-data.sh "$(AGENCY_DATA_DIR)" $(AGENCIES) $(DATAGEN_ARGS)
	[ "$(TLS)" = off ] || $(DOCKER_ENV) docker/generate-keys.sh "$(KEYS_DIR)" $(AGENCIES)
	$(MAKE) --no-print-directory docker-compose-file
	$(COMPOSE) -p $(COMPOSE_PROJECT) -f $(COMPOSE_YAML) up -d --remove-orphans
	@echo "started: the server and $(AGENCIES) agencies. Follow: make docker-compose-logs   Stop: make docker-compose-down"

docker-compose-logs:
	$(COMPOSE) -p $(COMPOSE_PROJECT) -f $(COMPOSE_YAML) logs -f

docker-compose-down:
	$(DOCKER_ENV) docker/compose-down.sh

# Images, five agencies under compose, their winners, a graceful stop. Starts
# a Docker engine if none runs (root); prints SKIPPED when it cannot.
test-docker:
	tests/e2e/test_docker_compose.sh

# Binaries, /etc/lottery/config.ini, the systemd unit and its user.
install: build
	DESTDIR="$(DESTDIR)" cmake --install $(BUILD_DIR) $(if $(PREFIX),--prefix $(PREFIX))
	@DESTDIR="$(DESTDIR)" packaging/post-install.sh

# A staged install (DESTDIR), checked file by file, and systemd-analyze verify.
test-install: build
	tests/e2e/test_install.sh $(BUILD_DIR)

# ---------------------------------------------------------------- benchmarks (issue 6)
# make bench              ~12 min: lottery-server vs the discard sink vs Redis, micro-benchmarks,
#                         charts; results in $(BUILD_DIR)/bench-results/ (see docs/PERFORMANCE.md)
# make bench BENCH_QUICK=1  the same in ~3 min (fewer, shorter runs)
BENCH_DEPS := redis-server gnuplot-nox
BENCH_OPTIONAL_DEPS := linux-perf
BENCH_QUICK ?= 0

.PHONY: bench bench-deps

bench-deps:
	@missing=""; \
	for p in $(BENCH_DEPS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	optional=""; \
	for p in $(BENCH_OPTIONAL_DEPS); do dpkg -s $$p >/dev/null 2>&1 || optional="$$optional $$p"; done; \
	if [ -z "$$missing$$optional" ]; then echo "bench-deps: all present"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
	  echo "bench-deps: installing$$missing$$optional"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  [ -z "$$optional" ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$optional \
	    || echo "bench-deps: $$optional unavailable; the profile step is skipped"; \
	elif [ -n "$$missing" ]; then \
	  echo "bench-deps: missing$$missing (optional:$$optional)"; \
	  echo "run:  sudo apt-get update && sudo apt-get install -y$$missing$$optional"; \
	  exit 1; \
	else \
	  echo "bench-deps: optional$$optional missing (no perf profile); run: sudo apt-get install -y$$optional"; \
	fi

# Only what the benchmark runs is built (not the tests).
BENCH_TARGETS := lottery-server lottery-loadgen bench-discard-sink lottery_bench bench-alloc-count

bench: deps bench-deps $(BUILD_DIR)/build.ninja
	cmake --build $(BUILD_DIR) -j $(JOBS) --target $(BENCH_TARGETS)
	BIN_DIR=$(CURDIR)/$(BUILD_DIR)/bin BENCH_QUICK=$(BENCH_QUICK) bench/compare.sh

# ---------------------------------------------------------------- hostile input (issue 8)
# Server memory per idle connection and against the bets stored
# (docs/PERFORMANCE.md "Memory: idle connections and stored bets").
IDLE_CONNECTIONS ?= 10000
IDLE_BETS ?= 2000000
IDLE_IO ?= epoll

.PHONY: bench-idle

bench-idle: deps $(BUILD_DIR)/build.ninja
	cmake --build $(BUILD_DIR) -j $(JOBS) --target lottery-server bench-idle-connections
	$(BUILD_DIR)/bin/bench-idle-connections --bin-dir $(BUILD_DIR)/bin --connections $(IDLE_CONNECTIONS) \
	  --bets $(IDLE_BETS) --io $(IDLE_IO)
