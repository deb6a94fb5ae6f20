# ordersync — every command a developer or CI needs.
CARGO ?= cargo

.PHONY: build release test lint fmt e2e bench crash-test fuzz-api demo

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

## SIGKILL the server under write load, restart, verify nothing acknowledged was lost.
crash-test:
	$(CARGO) test --release --test crash -- --ignored --nocapture

## Schemathesis against a live server, driven by docs/openapi.json.
fuzz-api:
	bash scripts/fuzz-api.sh
