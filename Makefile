# dfndr: the two commands a fresh machine needs are `make demo` and `make test`.
CARGO ?= cargo
DEMO_OUT ?= demo-out

MOTO_VENV ?= target/moto-venv

.PHONY: all deps build release demo test lint fmt clean s3-server

all: build

## Optional system packages. nasm lets mozjpeg-sys assemble libjpeg-turbo's x86 SIMD (JPEG
## decoding ~1.7x faster, same pixels); without it the build falls back to the plain C decoder.
## A build made before nasm was installed keeps the C decoder until mozjpeg-sys is rebuilt,
## hence the clean of that one package.
deps:
	@if command -v nasm >/dev/null 2>&1; then echo "nasm: $$(nasm -v)"; \
	else (apt-get update && apt-get install -y nasm) || echo "warning: nasm not installed; JPEG decoding without SIMD"; \
	  $(CARGO) clean -p mozjpeg-sys; $(CARGO) clean --release -p mozjpeg-sys; fi

build:
	$(CARGO) build --workspace

release:
	$(CARGO) build --release -p dfndr

## Run the reinforce job on the bundled demo shards into a fresh output, then show its status.
demo: deps release
	rm -rf $(DEMO_OUT)
	./target/release/dfndr reinforce --config configs/demo.toml --output $(DEMO_OUT)
	./target/release/dfndr status $(DEMO_OUT)
	./target/release/dfndr inspect $(DEMO_OUT)/shards/demo-00000.parquet --rows 2
	./target/release/dfndr show-aug $(DEMO_OUT)/shards/demo-00000.parquet --key 000000000 --out $(DEMO_OUT)/show-aug
	./target/release/dfndr encode --model ViT-B-32 --weights random:0 --text "a photo of an astronaut" \
	    --out $(DEMO_OUT)/encode.npy
	./target/release/dfndr export-wds $(DEMO_OUT) $(DEMO_OUT)/apple-wds --no-progress

## A real S3-compatible server for the object-store tests: moto's server mode from PyPI, in a
## virtual environment under target/ (the tests find it there, or via DFNDR_MOTO_SERVER).
s3-server: $(MOTO_VENV)/bin/moto_server

$(MOTO_VENV)/bin/moto_server:
	@python3 -m venv --help >/dev/null 2>&1 || (apt-get update && apt-get install -y python3-venv)
	python3 -m venv $(MOTO_VENV)
	$(MOTO_VENV)/bin/pip install --quiet --disable-pip-version-check "moto[server]==5.1.22"

## Every test: unit, property, format, reader, object-store and end-to-end job-control tests;
## plus lints.
test: s3-server
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) test --workspace

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf $(DEMO_OUT)
