# sluice — `make help` lists the targets.
GO        ?= go
PKGS      ?= ./...
TESTFLAGS ?= -race -count=1 -timeout 15m

.PHONY: help
help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: dev
dev: ## run sluice dev (api + worker + fake upstream, zero setup)
	$(GO) run ./cmd/sluice dev

.PHONY: build
build: ## build ./bin/sluice
	$(GO) build -o bin/sluice ./cmd/sluice

.PHONY: test
test: ## run every test with the race detector (needs redis-server on PATH)
	$(GO) test $(TESTFLAGS) $(PKGS)

.PHONY: vet
vet: ## gofmt check, go vet and staticcheck (installed at its pinned version)
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	$(GO) install honnef.co/go/tools/cmd/staticcheck@v0.8.2
	$$($(GO) env GOPATH)/bin/staticcheck $(PKGS)

.PHONY: chaos
chaos: ## fault suite, full size: real processes SIGKILLed, SIGSTOPped, restarted under load; prints a table (needs redis-server)
	$(GO) test -race -count=1 -v -timeout 30m ./chaos -args -chaos.full

.PHONY: test-ha
test-ha: ## Redis failover tests, full size: Sentinel and Redis Cluster primaries SIGKILLed under load (needs redis-server)
	$(GO) test -race -count=1 -v -timeout 30m -run 'TestSentinelFailover|TestClusterFailover' ./chaos -args -chaos.full

.PHONY: bench
bench: ## run the Go benchmarks
	$(GO) test -run '^$$' -bench . -benchmem $(PKGS)

.PHONY: docker
docker: ## build the container image
	docker build -t sluice .
