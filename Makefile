# The README's quick start is exactly `make demo` and `make test`; each sets itself up idempotently.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.mavilt-installed
CACHE := .cache
IU_REPORTS := $(CACHE)/iu_xray/ecgen-radiology
TXV_WHEEL := torchxrayvision==1.5.7
PYTEST_ARGS ?=

.PHONY: setup demo test test-all bench gpu-wheels lock clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Reinstalls only when pyproject.toml or the lock file changes.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	@# Without CUDA, take the CPU build of torch first; otherwise pip pulls a multi-GB CUDA build.
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install --quiet -c constraints.txt "torch==2.13.0"; fi
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

# The 3,955 real IU X-ray (OpenI) report XMLs ship inside torchxrayvision's wheel: fetch the wheel without
# installing it (it would pull torchvision) and unpack the one archive. CC BY-NC-ND 4.0: use, never commit.
$(IU_REPORTS): | $(STAMP)
	@mkdir -p $(CACHE)/wheels $(CACHE)/iu_xray
	@ls $(CACHE)/wheels/torchxrayvision-*.whl >/dev/null 2>&1 || \
		$(PIP) download --quiet --no-deps $(TXV_WHEEL) -d $(CACHE)/wheels
	@$(PY) -c "import zipfile,glob,tarfile,io; \
		z=zipfile.ZipFile(sorted(glob.glob('$(CACHE)/wheels/torchxrayvision-*.whl'))[-1]); \
		tarfile.open(fileobj=io.BytesIO(z.read('torchxrayvision/data/NLMCXR_reports.tgz'))).extractall('$(CACHE)/iu_xray', filter='data')"
	@echo "IU X-ray reports: $$(ls $(IU_REPORTS) | wc -l) XML files in $(IU_REPORTS)"

setup: $(STAMP) $(IU_REPORTS)

demo: setup
	$(PY) jobs/pipeline.py --config tiny --runs runs --name demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

# The CPU benchmarks (about 10 minutes): benchmarks/RESULTS.md and the README's table. Not part of `make test`.
bench: setup
	$(PY) benchmarks/run_all.py

# Wheels for benchmarks/gpu.sh on a GPU machine with no network (Python 3.12, x86-64, its own torch and
# transformers): DeepSpeed and the VQ-GAN's vector-quantize-pytorch, with what they need beyond that machine's
# packages, at the lock file's versions. One version of each: a second would stop the install there.
GPU_WHEEL_DEPS := hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions \
	vector-quantize-pytorch einx frozendict loguru torch-einops-utils einops
GPU_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64,--platform $(p))

gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	$(PIP) download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -c constraints.txt -d .whl $(GPU_WHEEL_DEPS)
	@# DeepSpeed ships only an sdist: build a pure-Python wheel, no ops (the engine uses a torch optimizer).
	DS_BUILD_OPS=0 $(PIP) wheel --quiet --no-deps --no-build-isolation -c constraints.txt -w .whl deepspeed
	@ls .whl; du -ch .whl/*.whl | tail -1

# Rewrite the lock file from the current environment (after changing pyproject.toml).
lock: $(STAMP)
	$(PIP) freeze --exclude-editable | grep -v '^mavilt' | sed -E 's/^(torch==[^+]+)\+cpu/\1/' > constraints.txt

clean:
	rm -rf $(VENV) $(CACHE) runs .pytest_cache
