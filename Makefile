GO        ?= go
FUZZTIME  ?= 10s
BENCHTIME ?= 1s

.PHONY: all test race unit lint fuzz bench cover generate check-generated tidy-check help

### all: lint, then the full test command
all: lint test

### test: THE test command (CI runs it): vet + gofmt, generated code fresh, race tests, a short fuzz pass
test: lint check-generated race fuzz

### race: every package's tests under the race detector
race:
	$(GO) test -race -count=1 -timeout 20m ./...

### unit: quick tests without the race detector or the slow churn tests
unit:
	$(GO) test -short -count=1 ./...

### lint: go vet and gofmt
lint:
	$(GO) vet ./...
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

### fuzz: every fuzz target for FUZZTIME each
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzPairKey$$' -fuzztime $(FUZZTIME) .
	$(GO) test -run '^$$' -fuzz '^FuzzMetadataQuery$$' -fuzztime $(FUZZTIME) ./e2b

### generate: regenerate the E2B client from internal/e2bapi/openapi.yml
generate:
	$(GO) generate ./...

### check-generated: fail when the generated code is stale
check-generated: generate
	@git diff --exit-code -- internal/e2bapi || { echo "generated code is stale: run make generate and commit"; exit 1; }

### bench: benchmarks
bench:
	$(GO) test -run '^$$' -bench . -benchmem -benchtime $(BENCHTIME) ./...

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
