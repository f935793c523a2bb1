GO        ?= go
# Recipes pipe test output through filters (tee, grep): pipefail keeps a
# failing test from hiding behind a filter that succeeded.
SHELL       := bash
.SHELLFLAGS := -o pipefail -ec
# FUZZTIME is a count of inputs, not a duration: with a duration, Go 1.26's
# fuzz coordinator can report its own deadline as a failure when a worker
# is mid-input at the end on a loaded machine (golang/go#75804, fixed in
# 1.27), which failed CI with no input found. 100,000 inputs take about 10 s
# here.
FUZZTIME  ?= 100000x
BENCHTIME ?= 1s
# HOTCOUNT runs of the hot-path and Redis-path benchmarks, each in a fresh
# test process: where the heap places a pool's slots and a map's buckets is
# decided once per process, and moves the hot path's figures more than
# anything within one. The table reports their medians, and ratios as the
# median of side-by-side runs (the same process's).
HOTCOUNT  ?= 5

.PHONY: all test race unit lint fuzz bench bench-history soak cover generate check-generated tidy-check help

### all: lint, then the full test command
all: lint test

### test: THE test command (CI runs it): vet + gofmt, generated code fresh, race tests, a short fuzz pass, a short soak
test: lint check-generated race fuzz
	$(MAKE) soak DURATION=45s

### race: every package's tests under the race detector
race:
	$(GO) test -race -count=1 -timeout 20m ./...

### unit: quick tests without the race detector or the slow churn tests
unit:
	$(GO) test -short -count=1 ./...

# STATICCHECK runs honnef.co/go/tools at a pinned version through go run,
# so the linter and its dependencies stay out of the library's go.mod (a
# tool requirement there would take part in every importer's version
# selection).
STATICCHECK ?= $(GO) run honnef.co/go/tools/cmd/staticcheck@v0.8.2

### lint: go vet, gofmt and staticcheck (the soak's build tag included)
lint:
	$(GO) vet ./...
	$(GO) vet -tags soak .
	$(STATICCHECK) ./...
	$(STATICCHECK) -tags soak .
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

### fuzz: every fuzz target for FUZZTIME inputs each (FUZZTIME=30s for a duration)
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzPairKey$$' -fuzztime $(FUZZTIME) .
	$(GO) test -run '^$$' -fuzz '^FuzzRemovalMessage$$' -fuzztime $(FUZZTIME) .
	$(GO) test -run '^$$' -fuzz '^FuzzRecord$$' -fuzztime $(FUZZTIME) .
	$(GO) test -run '^$$' -fuzz '^FuzzConfigFromEnv$$' -fuzztime $(FUZZTIME) .
	$(GO) test -run '^$$' -fuzz '^FuzzParseFailedMasters$$' -fuzztime $(FUZZTIME) .
	$(GO) test -run '^$$' -fuzz '^FuzzMetadataQuery$$' -fuzztime $(FUZZTIME) ./e2b
	$(GO) test -run '^$$' -fuzz '^FuzzRetryAfter$$' -fuzztime $(FUZZTIME) ./e2b

### generate: regenerate the E2B client from internal/e2bapi/openapi.yml
generate:
	$(GO) generate ./...

### check-generated: fail when the generated code is stale
check-generated: generate
	@git diff --exit-code -- internal/e2bapi || { echo "generated code is stale: run make generate and commit"; exit 1; }

### bench: benchmarks vs their baselines (real redis-server when installed; hot and Redis paths in HOTCOUNT fresh processes, medians and paired ratios; hot path with pairs in random order (ids read by pair and in arrival order), in creation order and in cache); raw output in testdata/bench.txt
bench:
	@set -e; port=$$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])' 2>/dev/null || echo 16399); \
	if command -v redis-server >/dev/null; then \
	  redis-server --port $$port --bind 127.0.0.1 --save '' --appendonly no --daemonize yes --pidfile /tmp/sandboxpool-bench-$$port.pid >/dev/null; \
	  sleep 0.3; export SANDBOXPOOL_BENCH_REDIS=127.0.0.1:$$port; echo "bench: redis-server on $$port"; \
	else echo "bench: redis-server not found, Redis benchmarks use miniredis"; fi; \
	trap 'test -f /tmp/sandboxpool-bench-$$port.pid && kill $$(cat /tmp/sandboxpool-bench-$$port.pid)' EXIT; \
	for i in $$(seq $(HOTCOUNT)); do \
	  $(GO) test -run '^$$' -bench '^BenchmarkHotPath(ArrivalIDs|IndexOrder|CacheResident)?$$' -benchmem -benchtime $(BENCHTIME) -count 1 -cpu 1,2 -timeout 60m . || exit 1; \
	done | tee testdata/bench.txt; \
	for i in $$(seq $(HOTCOUNT)); do \
	  $(GO) test -run '^$$' -bench '^BenchmarkRedisPaths$$' -benchmem -benchtime $(BENCHTIME) -count 1 -cpu 1,2 -timeout 60m . || exit 1; \
	done | tee -a testdata/bench.txt; \
	$(GO) test -run '^$$' -bench '^Benchmark(Contention|MemoryPerPair|ReaperTickIdle)$$' -benchmem -benchtime $(BENCHTIME) -cpu 1,2 -timeout 60m . | tee -a testdata/bench.txt; \
	$(GO) run ./internal/benchtable < testdata/bench.txt

### bench-history: one row per recorded run kept in testdata/ (bench-*.txt), the table testdata/README.md holds
bench-history:
	@$(GO) run ./internal/benchtable -history testdata/bench-*.txt

### soak: several managers, real redis-server, fake E2B, injected faults, under the race detector; DURATION=60s by default
DURATION ?= 60s
# SOAKRACE runs the soak under the race detector: its faults drive paths
# (breaker, recovery, lock loss, condemnation) through interleavings the
# unit tests do not reach. The soak paces its own load: with it, a
# 45-second soak served about three quarters of the Acquires it serves
# without, and every invariant held (SOAKRACE= to run without).
SOAKRACE ?= -race
soak:
	$(GO) test $(SOAKRACE) -tags soak -run '^TestSoak$$' -count=1 -v -timeout 30m . -soak.duration=$(DURATION) | grep -vE '^(=== RUN|--- PASS)'

### cover: coverage report in cover.out
cover:
	$(GO) test -race -count=1 -coverprofile=cover.out ./...
	$(GO) tool cover -func=cover.out | tail -1

### tidy-check: go.mod and go.sum are tidy
tidy-check:
	$(GO) mod tidy
	git diff --exit-code -- go.mod go.sum

help:
	@grep -E '^### ' $(MAKEFILE_LIST) | sed 's/^### /  /'
