# daert-stack: every command a developer or CI needs. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Go-built tools are cached per version outside the clone (a fresh clone reuses them) and
# linked into the project-local .tools/bin.
TOOLS_CACHE ?= $(HOME)/.cache/daert/tools
TOOLS := .tools/bin
BUF_VERSION := v1.60.0
GRPCURL_VERSION := v1.9.4
# helm renders and lints the chart, and is what `daert deploy` (pyhelm3) drives.
HELM_VERSION := v3.21.4
# The embedded Weaviate that `make up` and the tests run for DAERT_RETRIEVAL_BACKEND=weaviate.
WEAVIATE_VERSION := v1.35.2
# The embedded LLM server: llama.cpp's llama-server, built from the llama.cpp tree that the
# llama-cpp-python sdist on PyPI carries (vendor/llama.cpp), cached per sdist version.
LLAMA_CPP_PYTHON_VERSION := 0.3.36
LLAMA_CACHE := $(TOOLS_CACHE)/llama-server-$(LLAMA_CPP_PYTHON_VERSION)
# The local Kubernetes control plane of the chart's tests (built below; tools/kube pins the
# same k8s.io/kubernetes release) and kwok, which simulates its nodes.
KUBE_VERSION := v1.34.3
KWOK_VERSION := v0.8.0
KUBE_COMMANDS := kube-apiserver kube-controller-manager kube-scheduler
KUBE_TOOLS := $(addprefix $(TOOLS)/,$(KUBE_COMMANDS)) $(TOOLS)/kwok

# The packages sandboxed code may import, installed outside the clone, one folder per version
# of the list. As root, sandboxes run as uids of their own, which cannot read root's home.
SANDBOX_PACKAGES_LIST := services/daert/sandbox/packages.txt
SANDBOX_CACHE := $(if $(filter 0,$(shell id -u)),/var/cache/daert,$(HOME)/.cache/daert)
SANDBOX_PACKAGES := $(SANDBOX_CACHE)/sandbox-packages-$(shell sha256sum $(SANDBOX_PACKAGES_LIST) | cut -c1-12)
# Debian packages the stack runs: bubblewrap and libseccomp2 isolate the sandbox service;
# redis-server backs the generation cache and the LoRA router's shared state; etcd-server is
# the store of the local Kubernetes control plane the chart's tests install onto.
SYSTEM_PACKAGES := bubblewrap libseccomp2 redis-server etcd-server

export PATH := $(CURDIR)/$(TOOLS):$(PATH)
export HF_HUB_OFFLINE := 1
export DAERT_SANDBOX_PACKAGES_DIR ?= $(SANDBOX_PACKAGES)

.PHONY: help setup system-packages up test fuzz lint breaking proto bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

setup: system-packages $(VENV)/.installed $(SANDBOX_PACKAGES)/.installed $(TOOLS)/buf $(TOOLS)/grpcurl $(TOOLS)/helm $(TOOLS)/weaviate-server $(TOOLS)/llama-server $(KUBE_TOOLS) ## Debian packages, venv, Python deps, Go tools, llama-server (idempotent)

system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "installing $$missing"; apt-get update -qq && apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages: $$missing (run: sudo apt-get install $$missing)" >&2; exit 1; fi; \
	fi

$(SANDBOX_PACKAGES)/.installed: $(SANDBOX_PACKAGES_LIST) $(VENV)/.installed
	@echo "installing the sandbox's allowed packages into $(SANDBOX_PACKAGES)"
	$(PY) -m pip install --quiet --progress-bar off --target $(SANDBOX_PACKAGES) -r $(SANDBOX_PACKAGES_LIST)
	@touch $@

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "installing Python dependencies (torch is large the first time; pip caches it)"
	$(PY) -m pip install --quiet --progress-bar off -e '.[models,local,llm,ingest,airflow,gateway,dev]'
	@touch $@

# go install <module>@<version> into a per-version cache folder, then link it here.
define go_tool
$(TOOLS)/$(1):
	@mkdir -p $(TOOLS) $(TOOLS_CACHE)/$(1)-$(3)
	@test -x $(TOOLS_CACHE)/$(1)-$(3)/$(1) || { echo "building $(1) $(3) with go install"; \
	  GOBIN=$(TOOLS_CACHE)/$(1)-$(3) go install $(2)@$(3); }
	@ln -sfn $(TOOLS_CACHE)/$(1)-$(3)/$(1) $$@
endef
$(eval $(call go_tool,buf,github.com/bufbuild/buf/cmd/buf,$(BUF_VERSION)))
$(eval $(call go_tool,grpcurl,github.com/fullstorydev/grpcurl/cmd/grpcurl,$(GRPCURL_VERSION)))

# The local Kubernetes control plane of the chart's tests (daert.local.kube). kube-apiserver,
# kube-controller-manager and kube-scheduler come from k8s.io/kubernetes through the wrapper
# module tools/kube (its go.mod says why), with the version link-time values its own build
# sets (without them the server reports v0.0.0 and helm's kubeVersion checks fail); about ten
# minutes on two cores, once per version. kwok, which simulates the nodes, with go install.
KUBE_CACHE := $(TOOLS_CACHE)/kube-$(KUBE_VERSION)
KUBE_MINOR := $(word 2,$(subst ., ,$(KUBE_VERSION)))
KUBE_LDFLAGS := -s -w $(foreach pkg,k8s.io/client-go/pkg/version k8s.io/component-base/version,\
  -X $(pkg).gitVersion=$(KUBE_VERSION) -X $(pkg).gitMajor=1 -X $(pkg).gitMinor=$(KUBE_MINOR) \
  -X $(pkg).gitTreeState=clean -X $(pkg).buildDate=1970-01-01T00:00:00Z)
$(KUBE_CACHE)/.built:
	@test "$$(cd tools/kube && go list -m -f '{{.Version}}' k8s.io/kubernetes)" = $(KUBE_VERSION) || { \
	  echo "tools/kube/go.mod does not require k8s.io/kubernetes $(KUBE_VERSION)" >&2; exit 1; }
	@echo "building $(KUBE_COMMANDS) $(KUBE_VERSION) from tools/kube (about ten minutes, once)"
	@rm -rf $(KUBE_CACHE).tmp && mkdir -p $(KUBE_CACHE).tmp
	cd tools/kube && CGO_ENABLED=0 go build -trimpath -tags selinux,notest \
	  -ldflags "$(KUBE_LDFLAGS)" -o $(KUBE_CACHE).tmp/ $(addprefix k8s.io/kubernetes/cmd/,$(KUBE_COMMANDS))
	@rm -rf $(KUBE_CACHE) && mv $(KUBE_CACHE).tmp $(KUBE_CACHE) && touch $@
$(addprefix $(TOOLS)/,$(KUBE_COMMANDS)): | $(KUBE_CACHE)/.built
	@mkdir -p $(TOOLS)
	@ln -sfn $(KUBE_CACHE)/$(notdir $@) $@
$(eval $(call go_tool,kwok,sigs.k8s.io/kwok/cmd/kwok,$(KWOK_VERSION)))

# helm, with the link-time values its own Makefile sets: without them it reports "v3.21"
# (which pyhelm3 cannot parse) and renders offline for Kubernetes 1.20. 1.36 is the
# Kubernetes release of the client-go (v0.36) that helm v3.21.4 is built against.
HELM_K8S := -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 \
  -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=36 \
  -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 \
  -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=36
HELM_LDFLAGS := -X helm.sh/helm/v3/internal/version.version=$(HELM_VERSION) \
  -X helm.sh/helm/v3/internal/version.metadata= $(HELM_K8S)
HELM_CACHE := $(TOOLS_CACHE)/helm-$(HELM_VERSION)-k8s1.36
$(TOOLS)/helm:
	@mkdir -p $(TOOLS) $(HELM_CACHE)
	@test -x $(HELM_CACHE)/helm || { echo "building helm $(HELM_VERSION) with go install"; \
	  GOBIN=$(HELM_CACHE) go install -ldflags "$(HELM_LDFLAGS)" helm.sh/helm/v3/cmd/helm@$(HELM_VERSION); }
	@ln -sfn $(HELM_CACHE)/helm $@

# The same for weaviate-server, cached as weaviate-<version>/weaviate-server (about three
# minutes to build the first time). daert.local.weaviate finds it there.
$(TOOLS)/weaviate-server:
	@mkdir -p $(TOOLS) $(TOOLS_CACHE)/weaviate-$(WEAVIATE_VERSION)
	@test -x $(TOOLS_CACHE)/weaviate-$(WEAVIATE_VERSION)/weaviate-server || { \
	  echo "building weaviate-server $(WEAVIATE_VERSION) with go install (a few minutes)"; \
	  GOBIN=$(TOOLS_CACHE)/weaviate-$(WEAVIATE_VERSION) \
	    go install github.com/weaviate/weaviate/cmd/weaviate-server@$(WEAVIATE_VERSION); }
	@ln -sfn $(TOOLS_CACHE)/weaviate-$(WEAVIATE_VERSION)/weaviate-server $@

# llama-server with its shared libraries beside it (RPATH $$ORIGIN), so the cached folder is
# self-contained. About 11 minutes on two cores, once per version; BUILD_DIR keeps the objects
# of an interrupted build.
LLAMA_BUILD_DIR ?= $(TOOLS_CACHE)/llama-build-$(LLAMA_CPP_PYTHON_VERSION)
$(TOOLS)/llama-server:
	@mkdir -p $(TOOLS)
	@test -x $(LLAMA_CACHE)/llama-server || { \
	  echo "building llama-server from llama-cpp-python $(LLAMA_CPP_PYTHON_VERSION)'s llama.cpp (about 11 minutes, once)"; \
	  set -e; mkdir -p $(LLAMA_BUILD_DIR); \
	  test -d $(LLAMA_BUILD_DIR)/src || { \
	    python3 -m pip download --quiet --no-deps --no-binary :all: -d $(LLAMA_BUILD_DIR) \
	      llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION); \
	    rm -rf $(LLAMA_BUILD_DIR)/src.tmp; mkdir -p $(LLAMA_BUILD_DIR)/src.tmp; \
	    tar -xzf $(LLAMA_BUILD_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION).tar.gz \
	      -C $(LLAMA_BUILD_DIR)/src.tmp --strip-components=1; \
	    mv $(LLAMA_BUILD_DIR)/src.tmp $(LLAMA_BUILD_DIR)/src; }; \
	  cmake -S $(LLAMA_BUILD_DIR)/src/vendor/llama.cpp -B $(LLAMA_BUILD_DIR)/build \
	    -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF \
	    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF '-DCMAKE_BUILD_RPATH=$$ORIGIN' >/dev/null; \
	  cmake --build $(LLAMA_BUILD_DIR)/build --target llama-server -j $$(nproc); \
	  mkdir -p $(LLAMA_CACHE).tmp; \
	  cp -a $(LLAMA_BUILD_DIR)/build/bin/llama-server $(LLAMA_BUILD_DIR)/build/bin/*.so* $(LLAMA_CACHE).tmp/; \
	  rm -rf $(LLAMA_CACHE); mv $(LLAMA_CACHE).tmp $(LLAMA_CACHE); rm -rf $(LLAMA_BUILD_DIR); }
	@ln -sfn $(LLAMA_CACHE)/llama-server $@

up: setup ## run the whole stack locally (Ctrl-C stops it)
	$(VENV)/bin/daert up

test: setup ## run the test suite against real servers
	@# pytest exits 5 when it collected nothing: a failure, not a pass.
	$(VENV)/bin/pytest $(PYTEST_ARGS); status=$$?; \
	  if [ $$status -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; \
	  exit $$status

# The fuzz suite runs in `make test` with a small budget, derandomised; this runs it longer,
# with fresh random examples each time (failures kept in .hypothesis/ and replayed first).
FUZZ_EXAMPLES ?= 500
fuzz: setup ## the fuzz suite (tests/fuzz) with a large budget: FUZZ_EXAMPLES per RPC
	DAERT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) DAERT_FUZZ_PROFILE=fuzz $(VENV)/bin/pytest tests/fuzz $(PYTEST_ARGS)

lint: setup breaking ## buf lint, buf breaking, ruff, mypy
	cd proto && ../$(TOOLS)/buf lint
	$(VENV)/bin/ruff check services proto tests bench dags
	$(VENV)/bin/ruff format --check services proto tests bench dags
	$(VENV)/bin/mypy

# The contracts must stay wire- and source-compatible with the last released ones: the commit
# before tool calling was added (there is no release tag yet; move this when one exists).
BREAKING_BASE ?= 9c17abb9d99b0a3c6a27a79e244bd6db0d83a6cb
GIT_COMMON_DIR = $(shell git rev-parse --path-format=absolute --git-common-dir)
breaking: setup ## buf breaking: the contracts against BREAKING_BASE
	cd proto && ../$(TOOLS)/buf breaking --against '$(GIT_COMMON_DIR)#ref=$(BREAKING_BASE),subdir=proto'

proto: setup ## regenerate the Python stubs from proto/
	rm -f services/daert/v1/*_pb2*.py services/daert/v1/*_pb2*.pyi
	$(PY) proto/generate.py services

bench: setup ## print benchmark figures (see bench/)
	$(PY) bench/embedding_bench.py
	$(PY) bench/retrieval_bench.py
	$(PY) bench/rerank_bench.py
	$(PY) bench/sandbox_bench.py
	PYTHONPATH=. $(PY) bench/generation_bench.py
	$(PY) bench/lora_router_bench.py
	PYTHONPATH=. $(PY) bench/llm_bench.py
	PYTHONPATH=. $(PY) bench/context_bench.py
	PYTHONPATH=. $(PY) bench/ingest_bench.py
	PYTHONPATH=. $(PY) bench/gateway_bench.py
	PYTHONPATH=. $(PY) bench/planner_bench.py

clean: ## remove the venv and tool links (caches outside the clone stay)
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache
