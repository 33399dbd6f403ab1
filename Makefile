# filterd — developer and operator shortcuts.
#   make run    set up a virtualenv and run the gateway on the embedded defaults
#   make test   set up the virtualenv (with test extras) and run the whole test suite
#   make deb    build the Debian package (see packaging/debian/README.Debian)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test venv clean deb

$(STAMP): pyproject.toml setup.py filterd/bayes/_speedups.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# The quick start: a gateway on 127.0.0.1:2525 with its state in ./filterd-state; mail for
# demo.test lands in ./filterd-state/mail/demo.test/<user>/Maildir/new/ (try: make run, then
# swaks --server 127.0.0.1:2525 --to alice@demo.test).
RUN_STATE ?= $(CURDIR)/filterd-state
RUN_LISTEN ?= 127.0.0.1:2525
RUN_DOMAIN ?= demo.test
run: $(STAMP)
	@mkdir -p $(RUN_STATE)
	$(VENV)/bin/filterd serve --log-level info --listen $(RUN_LISTEN) \
	  --set server.state_dir=$(RUN_STATE) --set server.hostname=localhost \
	  --set 'delivery.local_domains=["$(RUN_DOMAIN)"]' $(RUN_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

# Build the Debian package from a clean export of the committed tree (git archive HEAD), so
# local uncommitted files never leak into it. Needs: dpkg-dev debhelper dh-virtualenv.
DEB_BUILD := build/deb
deb:
	rm -rf $(DEB_BUILD) && mkdir -p $(DEB_BUILD)/src
	git archive --format=tar HEAD | tar -x -C $(DEB_BUILD)/src
	cp -r $(DEB_BUILD)/src/packaging/debian $(DEB_BUILD)/src/debian
	cd $(DEB_BUILD)/src && dpkg-buildpackage -us -uc -b
	lintian --fail-on error --suppress-tags-from-file packaging/lintian-suppress $(DEB_BUILD)/*.changes || \
		{ echo "lintian found errors"; exit 1; }
	@ls -1 $(DEB_BUILD)/*.deb
