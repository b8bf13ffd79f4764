# evio: the README's two commands are `make demo` and `make test`.
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: deps build release demo image test lint unit

deps:
	./scripts/deps.sh

build: deps
	cargo build --workspace --all-targets

release: deps
	cargo build --release --workspace --bins

# evio's container image as an OCI archive, built offline (no base image, no registry): target/evio-image.tar.
image: release
	python3 scripts/image.py --bin-dir target/release --out target/evio-image.tar

# The main job: builds and runs the demo.
demo: release
	./scripts/demo.sh

lint: deps
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# All tests: unit, simulation and integration (root, network namespaces, real etcd/OVS/coturn/containerd/podman).
test: deps lint
	cargo build --workspace --bins
	cargo test --workspace --no-fail-fast -- --test-threads=4
	# the tunnel core's simulation runs boringtun on a fake clock: a feature never enabled in a workspace build
	cargo test -p evio-tunnel --features mock-time --test sim
	cargo test -p evio-overlay --features mock-time --test sim
	# the agents' suites again in CA mode (every agent joins with a token; peers need certificates); the
	# test of a VIP asked for with --address does not apply there (the signer assigns VIPs)
	EVIO_TEST_CA=1 cargo test -p eviod --test overlay --test resilience -- --skip a_vip_held_by_another_node_is_refused
