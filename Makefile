# nvmirror: the two commands of the README, and their parts.
#
#   make drill   the main job: a pair of nodes on this machine, a verifying
#                workload through NBD, faults on the owner (kill -9, SIGSTOP,
#                an interconnect cut), takeover, verification, giveback, and
#                the takeover timings with the log 1/50/100 % full; a report.
#   make test    everything CI runs: unit, property, concurrency and
#                integration tests, the deterministic simulation of the
#                pair (150 seeds), the loom model, fuzz smoke runs, the
#                benchmarks in quick mode, and the Soft-RoCE tier (in one
#                throw-away qemu guest where the host has no RDMA).
#                Installs what it needs first.
#
# Other targets: deps, lint, bench (full-length benchmarks), fuzz (longer
# fuzz runs: make fuzz FUZZ_SECONDS=600), sim-soak (the simulation, seed
# after seed, until stopped).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test

# Debian packages the build and the tests use: a C toolchain for -sys
# crates, and the stock NBD clients the tests drive (qemu-io, qemu-img;
# nbdinfo, nbdcopy; nbdsh).
APT_PACKAGES := build-essential pkg-config qemu-utils libnbd-bin python3-libnbd \
	libibverbs-dev librdmacm-dev clang libclang-dev
FUZZ_SECONDS ?= 15
FUZZ_SEED ?= 20261121
CARGO ?= cargo
# Crates with a fuzz/ directory (cargo-fuzz layout): the root package's and
# each member's.
FUZZ_CRATES := $(if $(wildcard fuzz/Cargo.toml),.) $(patsubst %/fuzz/Cargo.toml,%,$(wildcard */fuzz/Cargo.toml))

DRILL_CYCLES ?= 6

.PHONY: drill test deps lint unit loom fuzz-smoke fuzz bench-smoke bench rdma sim-soak

drill: deps
	$(CARGO) build --release --locked -p nvmirror
	./target/release/nvmirror drill --cycles $(DRILL_CYCLES) --profile-takeover


test: deps unit loom fuzz-smoke bench-smoke rdma
	@echo "make test: all tiers passed"

## deps: install what is missing (apt packages, cargo-fuzz); never upgrades.
deps:
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs), then re-run make" >&2; exit 1; }
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s "$$p" >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		sudo=""; [ "$$(id -u)" = 0 ] || sudo="sudo"; \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q; \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

## unit: every crate's tests (tiers 1, 2 and 4 of DESIGN.md).
unit:
	$(CARGO) test --workspace --locked

## loom: the send queue's slot accounting under the loom model checker.
loom:
	RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom $(CARGO) test -p interconnect --release --lib --locked loom

## fuzz-smoke: every fuzz target for FUZZ_SECONDS on its committed corpus,
## with libFuzzer's random generator seeded by FUZZ_SEED (fixed for the
## test command, so that a CI run explores what a local run explored; a
## longer run only goes further down the same path). New inputs go to a
## scratch directory. A crash fails the run, prints the panic and leaves the
## input in <crate>/fuzz/artifacts/: commit it under regressions/, where
## the crate's fuzz_corpus test replays it from then on.
fuzz-smoke:
	@for crate in $(FUZZ_CRATES); do \
		for target in $$(cd $$crate && cargo fuzz list); do \
			scratch=$$(mktemp -d); log=$$scratch.log; \
			echo "fuzz $$crate/$$target for $(FUZZ_SECONDS)s, seed $(FUZZ_SEED)"; \
			if ! (cd $$crate && cargo fuzz run --sanitizer none $$target $$scratch fuzz/corpus/$$target -- \
				-seed=$(FUZZ_SEED) -max_total_time=$(FUZZ_SECONDS) -max_len=16384 -print_final_stats=1) >$$log 2>&1; then \
				echo "FUZZ FAILURE in $$crate/$$target (seed $(FUZZ_SEED)):" >&2; \
				grep -E -A2 "panicked at|ERROR: libFuzzer|Test unit written|Reproduce with" $$log >&2 || tail -n 40 $$log >&2; \
				rm -rf $$scratch $$log; exit 1; \
			fi; \
			tail -n 6 $$log; rm -rf $$scratch $$log; \
		done; \
	done

## sim-soak: the deterministic simulation, seed after seed from a random
## first one, until stopped (a failing seed prints its replay command).
sim-soak:
	$(CARGO) run --release --locked -p nvmirror -- sim --soak

## fuzz: longer runs from a fresh random seed (printed, so a find replays):
## make fuzz FUZZ_SECONDS=600
fuzz:
	$(MAKE) fuzz-smoke FUZZ_SECONDS=$(FUZZ_SECONDS) FUZZ_SEED=$$(( (RANDOM << 15 | RANDOM) + 1 ))

## rdma: the Soft-RoCE tier (soft-roce/rdma-tier: the RDMA transport's
## tests, a pair over RDMA with qemu-io, a resync over a throttled RDMA
## link, a drill over RDMA): directly where
## RDMA devices exist, else in one throw-away qemu guest (soft-roce/).
rdma:
	$(CARGO) build --locked --release -p nvmirror --features rdma
	@tests=$$($(CARGO) test --locked -p interconnect --features rdma --test rdma --no-run --message-format=json \
		| sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1); \
	test -x "$$tests" || { echo "could not build the RDMA tests" >&2; exit 1; }; \
	slow_link=$$($(CARGO) test --locked -p nvmirror --test slow_link_resync --no-run --message-format=json \
		| grep '"name":"slow_link_resync"' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1); \
	test -x "$$slow_link" || { echo "could not build the slow-link resync test" >&2; exit 1; }; \
	if soft-roce/have-rdma --quiet; then \
		soft-roce/rdma-tier "$$tests" target/release/nvmirror "$$slow_link"; \
	else \
		soft-roce/run-in-guest --timeout 1500 -- soft-roce/rdma-tier "$$tests" target/release/nvmirror "$$slow_link"; \
	fi

## bench-smoke: the benchmarks in quick mode, so they cannot rot.
bench-smoke:
	NVMIRROR_BENCH_QUICK=1 $(CARGO) bench --locked -p nvlog --bench nvlog
	NVMIRROR_BENCH_QUICK=1 $(CARGO) bench --locked -p interconnect --bench interconnect
	NVMIRROR_BENCH_QUICK=1 $(CARGO) bench --locked -p nvmirror --bench takeover

bench:
	$(CARGO) bench --locked -p nvlog --bench nvlog
	$(CARGO) bench --locked -p interconnect --bench interconnect
	$(CARGO) bench --locked -p nvmirror --bench takeover
