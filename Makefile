# One way to check everything: `make test`, locally and in CI.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint typecheck pytest chromium promtool demo bench bench-smoke soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall only when pyproject.toml or the pins change. The integration extras are installed
# too, at the versions their tests were built against.
$(STAMP): pyproject.toml tests/constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,postgres,pipecat,livekit]' -c tests/constraints.txt
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) chromium promtool
	$(BIN)/pytest $(PYTEST_ARGS)

# The dashboard's end-to-end test drives Debian's headless Chromium; CI machines start without it.
chromium:
	@test -x /usr/bin/chromium || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

# The alert rules are checked by promtool (Debian's prometheus package) and the systemd unit by
# systemd-analyze (tests/test_operations.py); installed when missing, as chromium is.
promtool:
	@test -x /usr/bin/promtool || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus)
	@test -x /usr/bin/systemd-analyze || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends systemd)

# Benchmarks print figures and write benchmarks/results.json; see BENCHMARKS.md.
BENCHES := bench_repository bench_create bench_end bench_reaper bench_touch bench_memory bench_reconcile bench_recovery

bench: $(STAMP)
	@for b in $(BENCHES); do $(BIN)/python -m benchmarks.$$b || exit 1; done
	@$(BIN)/python -m benchmarks.bench_create --wide
	@if [ -n "$$SESSIONMGR_TEST_POSTGRES_URL" ]; then $(BIN)/python -m benchmarks.bench_create --postgres "$$SESSIONMGR_TEST_POSTGRES_URL" && $(BIN)/python -m benchmarks.bench_reaper --postgres "$$SESSIONMGR_TEST_POSTGRES_URL"; fi
	@$(BIN)/python -m benchmarks.summary

# Every benchmark at a tiny size, in seconds, so the suite never rots (part of `make test`).
bench-smoke: $(STAMP)
	@for b in $(BENCHES); do $(BIN)/python -m benchmarks.$$b --smoke || exit 1; done
	@$(BIN)/python -m benchmarks.bench_create --wide --smoke
	@$(BIN)/python -m benchmarks.profile_paths --smoke
	@$(BIN)/python -m benchmarks.summary --smoke

# 200 crash trials and 200 "recovery while others create" trials (tests/reliability/test_crash.py;
# CI runs 20 and 2) and their tallies, on SQLite and, with SESSIONMGR_TEST_POSTGRES_URL set, on
# PostgreSQL. SESSIONMGR_CRASH_SEED=S replays a run.
SOAK_TRIALS ?= 200

soak: $(STAMP)
	SESSIONMGR_CRASH_TRIALS=$(SOAK_TRIALS) SESSIONMGR_LIVE_TRIALS=$(SOAK_TRIALS) $(BIN)/pytest tests/reliability/test_crash.py -q -s -p no:cacheprovider

demo: $(STAMP)
	$(BIN)/sessionmgr demo

# pytest last, so its summary is the closing line CI reads.
test: lint typecheck bench-smoke pytest

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
