// Package chaos is sluice's fault suite: `make chaos` (or `go test ./chaos`
// for the short size). Each scenario starts its own real processes — a
// redis-server with AOF, the fake upstream, one `sluice api` and two `sluice
// worker`s, all on free loopback ports — drives load through the api as a
// client would (Idempotency-Key, retries on connection errors and 5xx),
// injects one fault (a SIGKILL, SIGTERM or SIGSTOP of one process) and
// counts what clients and the upstream saw: jobs accepted, succeeded,
// failed, lost, answers bought twice, 5xx and 503 answers. The suite prints
// one Markdown table row per scenario and fails on any miss. The package
// holds only tests; see chaos_test.go.
package chaos
