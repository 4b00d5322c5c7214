package main

import (
	"context"
	"flag"
	"fmt"
	"io"
)

const usage = `sluice — a fair, rate-limit-aware queue in front of the Anthropic Messages API.

Usage: sluice <command> [flags]

Commands:
  dev             zero-setup: api + worker + a fake upstream, on a Redis it finds or starts
  serve           api and worker in one process
  api             the HTTP api only (many may run against one Redis)
  worker          a worker only: runs queued jobs against the upstream
  fake-anthropic  a stand-in for the Anthropic API, with real limits and fault injection
  loadtest        drive a sluice through a scenario and measure utilization and fairness
  keygen          print a new random key and its sha256 form for the config file
  healthcheck     GET a URL, exit 0 on 200 (the container health check)
  help            this text

Run "sluice <command> --help" for the flags and environment variables of each.
`

// run is the whole program: main only calls it. It returns when ctx ends (a
// signal) or a part fails to start.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("no command given")
	}
	cmd, rest := args[0], args[1:]
	switch cmd {
	case "serve":
		return runServer(ctx, "serve", rest, getenv, stdout, stderr)
	case "api":
		return runServer(ctx, "api", rest, getenv, stdout, stderr)
	case "worker":
		return runServer(ctx, "worker", rest, getenv, stdout, stderr)
	case "dev":
		return runDev(ctx, rest, getenv, stdout, stderr)
	case "fake-anthropic":
		return runFake(ctx, rest, getenv, stdout, stderr)
	case "loadtest":
		return runLoadtest(ctx, rest, getenv, stdout, stderr)
	case "keygen":
		return runKeygen(rest, stdout, stderr)
	case "healthcheck":
		return runHealthcheck(ctx, rest, stdout, stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprint(stderr, usage)
	return fmt.Errorf("unknown command %q", cmd)
}

// envOr is the value of an environment variable, or def.
func envOr(getenv func(string) string, name, def string) string {
	if v := getenv(name); v != "" {
		return v
	}
	return def
}

var _ = flag.ErrHelp
