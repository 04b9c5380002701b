# Pico: the fixed make targets (see docs/architecture.md).
#   make setup  - Debian packages + .venv with the project installed (idempotent)
#   make test   - setup, build libpico, run the whole suite
#   make test-faults - setup, run the whole fault matrix (root; make test runs its short form)
#   make demo   - setup, run the main job on configs/demo.yaml
#   make bench  - setup, run every benchmark (quick mode with QUICK=1)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
DEB_PACKAGES := iptables libnetfilter-queue-dev openvswitch-switch openvswitch-common \
                iputils-ping ethtool tcpdump curl gcc g++ make iproute2 procps \
                python3 python3-venv python3-dev
PYTEST_ARGS ?=

.PHONY: setup deb venv lib test test-faults demo bench clean

setup: deb venv lib

# Install only what is missing, so a second run costs a dpkg query.
deb:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	    | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" != 0 ]; then echo "make setup: need root to install: $$missing" >&2; exit 1; fi; \
	    echo "installing Debian packages: $$missing"; \
	    export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	@[ -x $(VPY) ] || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(VPY) -m pip install -q -e '.[net,test]' 2>&1 | grep -v "^WARNING: Location" || true
	$(VPY) -c "import posix_ipc, numpy, zmq, yaml, netfilterqueue, faucet, pytest"
	touch $@

venv: $(VENV)/.installed

lib:
	$(MAKE) -C shared --no-print-directory

# pytest exit code 5 means "no tests collected": that is a failure for us, said clearly.
test: setup
	@set +e; $(VPY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc = 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The whole fault matrix (tests/test_faults_net.py, root); `make test` runs its short form.
# One JSON row per scenario goes to $(FAULTS_JSON); PICO_FAULTS_SEED=N repeats a run's moments.
FAULTS_JSON ?= build/faults.jsonl
test-faults: setup
	@mkdir -p $(dir $(FAULTS_JSON)); rm -f $(FAULTS_JSON); set +e; \
	PICO_FAULTS=full PICO_FAULTS_JSON=$(abspath $(FAULTS_JSON)) \
	    $(VPY) -m pytest -m faults tests/test_faults_net.py $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc = 5 ]; then echo "make test-faults: pytest collected no tests" >&2; exit 1; fi; \
	[ -s $(FAULTS_JSON) ] && $(VPY) tests/test_faults_net.py $(FAULTS_JSON); exit $$rc

demo: setup
	$(VENV)/bin/pico-demo --config configs/demo.yaml

bench: setup
	$(VENV)/bin/pico-bench all $(if $(QUICK),--quick) --json docs/bench-all.json

clean:
	$(MAKE) -C shared clean --no-print-directory
	rm -rf $(VENV) build *.egg-info
