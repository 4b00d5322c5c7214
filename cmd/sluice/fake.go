package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/fakeanthropic"
)

// `sluice fake-anthropic`'s defaults and environment.
const (
	fakeDefaultListen   = "127.0.0.1:8090"
	fakeEnvListen       = "FAKE_ANTHROPIC_LISTEN"
	fakeEnvAPIKey       = "FAKE_ANTHROPIC_API_KEY"
	fakeEnvAdminKey     = "FAKE_ANTHROPIC_ADMIN_KEY"
	fakeShutdownBudget  = 5 * time.Second
	fakeReadHeaderLimit = 10 * time.Second
)

// runFake runs `sluice fake-anthropic`.
//
// It serves a stand-in for the Anthropic Messages API (package
// fakeanthropic) with one model group for claude-*, real token buckets and
// headers, paced output and optional random faults, until ctx ends; then it
// gives in-flight requests 5 s to finish. Flags beat environment variables,
// which beat the defaults.
func runFake(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	o, err := parseFakeFlags(args, getenv, stderr)
	if err != nil {
		return err // flag.ErrHelp for --help: the caller treats it as success
	}
	logger := newLogger(config.Log{Format: "text", Level: "info"}, stderr)
	fake, err := fakeanthropic.New(o.config(logger))
	if err != nil {
		return err // names every problem of the flags
	}
	ln, err := net.Listen("tcp", o.listen)
	if err != nil {
		return fmt.Errorf("fake-anthropic: %w", err)
	}
	o.logConfig(logger)
	fmt.Fprintf(stdout, "fake-anthropic listening on http://%s\n", ln.Addr())
	return serveFake(ctx, ln, fake, logger)
}

// fakeOptions is `sluice fake-anthropic`'s flags and environment, resolved.
type fakeOptions struct {
	listen          string
	group           fakeanthropic.Group
	otpmMode        string
	tokensPerSecond float64
	latency         time.Duration
	batchDelay      time.Duration
	replyTokens     int
	seed            int64
	apiKeys         []string
	adminKeys       []string
	faults          []fakeanthropic.FaultRule
}

// parseFakeFlags reads the flags, then the environment for what they left
// unset.
func parseFakeFlags(args []string, getenv func(string) string, stderr io.Writer) (*fakeOptions, error) {
	tier := fakeanthropic.TierOne()[0]
	o := &fakeOptions{group: fakeanthropic.Group{Name: tier.Name, Models: tier.Models}}
	fs := flag.NewFlagSet("fake-anthropic", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.listen, "listen", "", "the `address` to listen on, host:port; port 0 picks a free port (default "+fakeDefaultListen+", env "+fakeEnvListen+")")
	fs.IntVar(&o.group.RPM, "rpm", tier.RPM, "requests per minute of the claude-* group")
	fs.IntVar(&o.group.InputTPM, "input-tpm", tier.InputTPM, "input tokens per minute (input + cache writes)")
	fs.IntVar(&o.group.OutputTPM, "output-tpm", tier.OutputTPM, "output tokens per minute")
	fs.StringVar(&o.otpmMode, "otpm-mode", fakeanthropic.OTPMRealtime, "output-token accounting `mode`: "+fakeanthropic.OTPMRealtime+
		" (the API's current rule: counted as produced, max_tokens ignored) or "+fakeanthropic.OTPMReserve+
		" (the older rule: max_tokens reserved at start, corrected at the end)")
	fs.BoolVar(&o.group.CountCacheReads, "count-cache-reads", false, "count cache reads toward input-tpm too, as legacy models do (reported as input_tokens_per_minute)")
	fs.IntVar(&o.group.CacheMinTokens, "cache-min-tokens", 0, "shortest prompt prefix a cache_control breakpoint caches; 0 = by model: 2048 for *haiku*, else 1024")
	fs.Float64Var(&o.tokensPerSecond, "tokens-per-second", 50, "output pace in tokens per second; 0 = as fast as possible")
	fs.DurationVar(&o.latency, "latency", 200*time.Millisecond, "wait before the first byte of an answer")
	fs.DurationVar(&o.batchDelay, "batch-delay", 30*time.Second, "how long a Message Batch processes before its results are ready")
	fs.IntVar(&o.replyTokens, "reply-tokens", fakeanthropic.DefaultReplyTokens,
		"reply length in output tokens when the prompt has no [[reply_tokens=N]]; always capped by max_tokens")
	fs.Int64Var(&o.seed, "seed", 0, "seed of the random faults; 0 = a random seed")
	keysSet, adminKeysSet := false, false
	fs.Func("api-key", "accepted API `key`s, repeatable or comma-separated; none = any non-empty key (env "+fakeEnvAPIKey+")",
		func(v string) error {
			keysSet = true
			o.apiKeys = append(o.apiKeys, splitKeys(v)...)
			return nil
		})
	fs.Func("admin-key", "accepted Admin API `key`s for GET /v1/organizations/rate_limits, repeatable or comma-separated; none = any sk-ant-admin… key (env "+fakeEnvAdminKey+")",
		func(v string) error {
			adminKeysSet = true
			o.adminKeys = append(o.adminKeys, splitKeys(v)...)
			return nil
		})
	fs.Func("fault", "a random fault, `KIND:RATE[:RETRY_AFTER]`, repeatable, e.g. overloaded:0.05 or rate_limit:0.01:2s",
		func(v string) error {
			rule, err := parseFault(v)
			o.faults = append(o.faults, rule)
			return err
		})
	fs.Usage = func() { fmt.Fprint(fs.Output(), fakeUsage(fs)) }
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("fake-anthropic: unexpected arguments %q", fs.Args())
	}
	if o.listen == "" {
		o.listen = envOr(getenv, fakeEnvListen, fakeDefaultListen)
	}
	if !keysSet {
		o.apiKeys = splitKeys(getenv(fakeEnvAPIKey))
	}
	if !adminKeysSet {
		o.adminKeys = splitKeys(getenv(fakeEnvAdminKey))
	}
	return o, nil
}

// parseFault reads one --fault: KIND:RATE or KIND:RATE:RETRY_AFTER.
func parseFault(v string) (fakeanthropic.FaultRule, error) {
	parts := strings.Split(v, ":")
	if len(parts) < 2 || len(parts) > 3 {
		return fakeanthropic.FaultRule{}, fmt.Errorf("want KIND:RATE or KIND:RATE:RETRY_AFTER, got %q", v)
	}
	rule := fakeanthropic.FaultRule{Kind: fakeanthropic.FaultKind(parts[0])}
	if !rule.Kind.Valid() {
		return rule, fmt.Errorf("unknown fault kind %q (known: %s)", parts[0], faultKinds())
	}
	rate, err := strconv.ParseFloat(parts[1], 64)
	if err != nil {
		return rule, fmt.Errorf("fault %q: rate %q is not a number", v, parts[1])
	}
	rule.Rate = rate
	if len(parts) == 3 {
		if rule.RetryAfter, err = time.ParseDuration(parts[2]); err != nil {
			return rule, fmt.Errorf("fault %q: retry-after: %w", v, err)
		}
	}
	return rule, nil
}

// faultKinds lists the fault kinds, comma-separated.
func faultKinds() string {
	kinds := fakeanthropic.FaultKinds()
	s := make([]string, len(kinds))
	for i, k := range kinds {
		s[i] = string(k)
	}
	return strings.Join(s, ", ")
}

// config is the fake's configuration.
func (o *fakeOptions) config(logger *slog.Logger) fakeanthropic.Config {
	return fakeanthropic.Config{
		Groups:          []fakeanthropic.Group{o.group},
		OTPMMode:        o.otpmMode,
		TokensPerSecond: o.tokensPerSecond,
		Latency:         o.latency,
		BatchDelay:      o.batchDelay,
		ReplyTokens:     o.replyTokens,
		APIKeys:         o.apiKeys,
		AdminKeys:       o.adminKeys,
		Faults:          o.faults,
		Seed:            o.seed,
		Logger:          logger,
	}
}

// logConfig logs what the fake serves, keys hidden.
func (o *fakeOptions) logConfig(logger *slog.Logger) {
	keys := "any non-empty key"
	if len(o.apiKeys) > 0 {
		keys = fmt.Sprintf("%d key(s), hidden", len(o.apiKeys))
	}
	admins := "any sk-ant-admin… key"
	if len(o.adminKeys) > 0 {
		admins = fmt.Sprintf("%d key(s), hidden", len(o.adminKeys))
	}
	faultList := make([]string, 0, len(o.faults))
	for _, f := range o.faults {
		faultList = append(faultList, fmt.Sprintf("%s:%g", f.Kind, f.Rate))
	}
	g := o.group
	logger.Info("fake-anthropic config", "models", strings.Join(g.Models, ","), "rpm", g.RPM,
		"input_tpm", g.InputTPM, "output_tpm", g.OutputTPM, "otpm_mode", o.otpmMode,
		"count_cache_reads", g.CountCacheReads, "cache_min_tokens", g.CacheMinTokens, "admin_keys", admins,
		"tokens_per_second", o.tokensPerSecond, "latency", o.latency, "reply_tokens", o.replyTokens,
		"api_keys", keys, "faults", strings.Join(faultList, ","), "seed", o.seed)
}

// serveFake serves fake on ln until ctx ends, then gives requests in flight
// fakeShutdownBudget to finish and cuts the rest.
func serveFake(ctx context.Context, ln net.Listener, fake http.Handler, logger *slog.Logger) error {
	srv := &http.Server{
		Handler:           fake,
		ReadHeaderTimeout: fakeReadHeaderLimit,
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	select {
	case err := <-served:
		return fmt.Errorf("fake-anthropic: serve: %w", err)
	case <-ctx.Done():
	}

	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), fakeShutdownBudget)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		// Streams still running after the budget are cut.
		logger.Warn("fake-anthropic: closing connections still open after the shutdown budget",
			"budget", fakeShutdownBudget, "err", err)
		_ = srv.Close()
	}
	if err := <-served; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("fake-anthropic: serve: %w", err)
	}
	return nil
}

// fakeUsage is `sluice fake-anthropic --help`.
func fakeUsage(fs *flag.FlagSet) string {
	return `Usage: sluice fake-anthropic [flags]

Serves a stand-in for the Anthropic Messages API: POST /v1/messages (streaming
or not) and /v1/messages/count_tokens, with tier-1-like token buckets and
anthropic-ratelimit-* headers, 429s, paced output and injected faults. Point a
client's base URL at it. One model group, "claude", matches every claude-*
model.

Output tokens count as produced (--otpm-mode realtime, the API's current
rule) unless --otpm-mode reserve. Prompt caching works as the API's:
cache_control {"type":"ephemeral"[,"ttl":"5m"|"1h"]} on up to 4 blocks (tools,
system, message content); prefixes under the minimum are not cached; usage
splits input_tokens, cache_creation_input_tokens and cache_read_input_tokens;
input-tpm counts input + cache writes (and reads with --count-cache-reads).

Admin API on the same address (x-api-key: an admin key, anthropic-version):
` + helpTable(
		[2]string{"GET /v1/organizations/rate_limits", "the group's limits, as the Rate Limits API lists them; an ordinary API key gets 403"},
	) + `
Control endpoints on the same address:
` + helpTable(
		[2]string{"GET /_fake/stats", "counters and the request log as JSON (?log=N: last N records)"},
		[2]string{"POST /_fake/reset", "zero the counters"},
		[2]string{"POST /_fake/faults", `queue faults for the next requests:` + "\n" +
			`{"faults":[{"kind":"overloaded"},` + "\n" + `{"kind":"rate_limit","retry_after_seconds":2}]}`},
		[2]string{"POST /_fake/cache/clear", `empty the prompt cache; answers {"cleared":N}`},
		[2]string{"POST /_fake/limits", `change the group's limits now, enforced and reported:` + "\n" +
			`{"group":"claude","rpm":10,"input_tpm":5000,` + "\n" + `"output_tpm":1000} (0/absent: unchanged)`},
	) + `
Prompt directives: [[reply_tokens=N]], [[cache_write=N]], [[cache_read=N]].
` + strings.Join(wrapHelp("Fault kinds: "+faultKinds()+".", helpWidth), "\n") + `

Flags (-name works as well as --name):
` + flagHelp(fs) + `
Environment:
` + helpTable(
		[2]string{fakeEnvListen, "the address to listen on (overridden by --listen)"},
		[2]string{fakeEnvAPIKey, "accepted API keys, comma-separated (overridden by --api-key)"},
		[2]string{fakeEnvAdminKey, "accepted Admin API keys, comma-separated (overridden by --admin-key)"},
	)
}

// splitKeys splits a comma-separated list of keys, dropping blanks.
func splitKeys(v string) []string {
	var keys []string
	for _, k := range strings.Split(v, ",") {
		if k = strings.TrimSpace(k); k != "" {
			keys = append(keys, k)
		}
	}
	return keys
}
