# ordersync — every command a developer or CI needs.
CARGO ?= cargo

.PHONY: build release test lint fmt e2e bench bench-quick crash-test fuzz-api demo

build:
	$(CARGO) build

release:
	$(CARGO) build --release

## Unit and integration tests (real server on an ephemeral port, temp databases).
test:
	$(CARGO) test --all-targets

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## Browser tests in headless Chromium + Node client tests (installs what it needs).
e2e:
	bash e2e/run.sh

## Load generator: starts its own server, prints the table (see README "Performance").
bench: release
	$(CARGO) build --release -p ordersync-bench
	./target/release/ordersync-bench $(BENCH_ARGS)

demo:
	$(CARGO) run --release -- demo
