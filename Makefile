# Every target builds (once) or reuses the virtualenv named in .ci/env.sh, then runs inside it.
SHELL := /bin/bash
RUN := source .ci/env.sh && seqep_ensure_venv &&

.PHONY: demo test test-slow lint bench venv
venv:
	@$(RUN) echo "virtualenv: $$SEQEP_VENV"
demo:
	@$(RUN) seqep demo $(ARGS)
test:
	@$(RUN) python -m pytest -q
test-slow:
	@$(RUN) python -m pytest -q -m slow
lint:
	@$(RUN) ruff check analog_ep spiking_ep tests experiments
bench:
	@$(RUN) seqep bench $(ARGS)
