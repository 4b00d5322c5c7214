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

	"github.com/sluice-dev/sluice/fakeanthropic"
)

// runFake runs `sluice fake-anthropic`.
//
// It serves a stand-in for the Anthropic Messages API (package
// fakeanthropic) with one model group for claude-*, real token buckets and
// headers, paced output and optional random faults, until ctx ends; then it
// gives in-flight requests 5 s to finish. Flags beat environment variables,
// which beat the defaults.
func runFake(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	const (
		defaultListen   = "127.0.0.1:8090"
		envListen       = "FAKE_ANTHROPIC_LISTEN"
		envAPIKey       = "FAKE_ANTHROPIC_API_KEY"
		envAdminKey     = "FAKE_ANTHROPIC_ADMIN_KEY"
		shutdownBudget  = 5 * time.Second
		readHeaderLimit = 10 * time.Second
	)
	tier := fakeanthropic.TierOne()[0]

	fs := flag.NewFlagSet("fake-anthropic", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "", "`address` to listen on; port 0 picks a free port (default "+defaultListen+", env "+envListen+")")
	rpm := fs.Int("rpm", tier.RPM, "requests per minute of the claude-* group")
	inputTPM := fs.Int("input-tpm", tier.InputTPM, "input tokens per minute (input + cache writes)")
	outputTPM := fs.Int("output-tpm", tier.OutputTPM, "output tokens per minute")
	otpmMode := fs.String("otpm-mode", fakeanthropic.OTPMRealtime, "output-token accounting: "+fakeanthropic.OTPMRealtime+
		" (the API's current rule: counted as produced, max_tokens ignored) or "+fakeanthropic.OTPMReserve+
		" (the older rule: max_tokens reserved at start, corrected at the end)")
	countCacheReads := fs.Bool("count-cache-reads", false, "count cache reads toward input-tpm too, as legacy models do (reported as input_tokens_per_minute)")
	cacheMinTokens := fs.Int("cache-min-tokens", 0, "shortest prompt prefix a cache_control breakpoint caches; 0 = by model: 2048 for *haiku*, else 1024")
	tokensPerSecond := fs.Float64("tokens-per-second", 50, "output pace in tokens per second; 0 = as fast as possible")
	latency := fs.Duration("latency", 200*time.Millisecond, "wait before the first byte of an answer")
	replyTokens := fs.Int("reply-tokens", fakeanthropic.DefaultReplyTokens,
		"reply length in output tokens when the prompt has no [[reply_tokens=N]]; always capped by max_tokens")
	seed := fs.Int64("seed", 0, "seed of the random faults; 0 = a random seed")
	var apiKeys []string
	keysSet := false
	fs.Func("api-key", "accepted API `key`s, repeatable or comma-separated; none = any non-empty key (env "+envAPIKey+")",
		func(v string) error {
			keysSet = true
			apiKeys = append(apiKeys, splitKeys(v)...)
			return nil
		})
	var adminKeys []string
	adminKeysSet := false
	fs.Func("admin-key", "accepted Admin API `key`s for GET /v1/organizations/rate_limits, repeatable or comma-separated; none = any sk-ant-admin… key (env "+envAdminKey+")",
		func(v string) error {
			adminKeysSet = true
			adminKeys = append(adminKeys, splitKeys(v)...)
			return nil
		})
	var faults []fakeanthropic.FaultRule
	fs.Func("fault", "random fault as `KIND:RATE[:RETRY_AFTER]`, repeatable, e.g. overloaded:0.05 or rate_limit:0.01:2s",
		func(v string) error {
			parts := strings.Split(v, ":")
			if len(parts) < 2 || len(parts) > 3 {
				return fmt.Errorf("want KIND:RATE or KIND:RATE:RETRY_AFTER, got %q", v)
			}
			rule := fakeanthropic.FaultRule{Kind: fakeanthropic.FaultKind(parts[0])}
			if !rule.Kind.Valid() {
				return fmt.Errorf("unknown fault kind %q (known: %v)", parts[0], fakeanthropic.FaultKinds())
			}
			rate, err := strconv.ParseFloat(parts[1], 64)
			if err != nil {
				return fmt.Errorf("fault %q: rate %q is not a number", v, parts[1])
			}
			rule.Rate = rate
			if len(parts) == 3 {
				if rule.RetryAfter, err = time.ParseDuration(parts[2]); err != nil {
					return fmt.Errorf("fault %q: retry-after: %w", v, err)
				}
			}
			faults = append(faults, rule)
			return nil
		})
	fs.Usage = func() {
		out := fs.Output()
		fmt.Fprint(out, `Usage: sluice fake-anthropic [flags]

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
  GET  /v1/organizations/rate_limits   the group's limits, as the Rate Limits API
                                       lists them; an ordinary API key gets 403

Control endpoints on the same address:
  GET  /_fake/stats        counters and the request log as JSON (?log=N: last N records)
  POST /_fake/reset        zero the counters
  POST /_fake/faults       queue faults for the next requests:
                           {"faults":[{"kind":"overloaded"},{"kind":"rate_limit","retry_after_seconds":2}]}
  POST /_fake/cache/clear  empty the prompt cache; answers {"cleared":N}
  POST /_fake/limits       change the group's limits now, enforced and reported:
                           {"group":"claude","rpm":10,"input_tpm":5000,"output_tpm":1000} (0/absent: unchanged)

Prompt directives: [[reply_tokens=N]], [[cache_write=N]], [[cache_read=N]].
Fault kinds: `)
		fmt.Fprintln(out, fakeanthropic.FaultKinds())
		fmt.Fprint(out, "\nFlags:\n")
		fs.PrintDefaults()
		fmt.Fprintf(out, `
Environment:
  %s     address to listen on (overridden by --listen)
  %s    accepted API keys, comma-separated (overridden by --api-key)
  %s  accepted Admin API keys, comma-separated (overridden by --admin-key)
`, envListen, envAPIKey, envAdminKey)
	}
	if err := fs.Parse(args); err != nil {
		return err // flag.ErrHelp for -h: the caller treats it as success
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("fake-anthropic: unexpected arguments %q", fs.Args())
	}

	addr := *listen
	if addr == "" {
		addr = getenv(envListen)
	}
	if addr == "" {
		addr = defaultListen
	}
	if !keysSet {
		apiKeys = splitKeys(getenv(envAPIKey))
	}
	if !adminKeysSet {
		adminKeys = splitKeys(getenv(envAdminKey))
	}

	logger := slog.New(slog.NewTextHandler(stderr, nil))
	fake, err := fakeanthropic.New(fakeanthropic.Config{
		Groups: []fakeanthropic.Group{{Name: tier.Name, Models: tier.Models, RPM: *rpm, InputTPM: *inputTPM, OutputTPM: *outputTPM,
			CountCacheReads: *countCacheReads, CacheMinTokens: *cacheMinTokens}},
		OTPMMode:        *otpmMode,
		TokensPerSecond: *tokensPerSecond,
		Latency:         *latency,
		ReplyTokens:     *replyTokens,
		APIKeys:         apiKeys,
		AdminKeys:       adminKeys,
		Faults:          faults,
		Seed:            *seed,
		Logger:          logger,
	})
	if err != nil {
		return err // names every problem of the flags
	}

	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("fake-anthropic: %w", err)
	}
	keys := "any non-empty key"
	if len(apiKeys) > 0 {
		keys = fmt.Sprintf("%d key(s), hidden", len(apiKeys))
	}
	admins := "any sk-ant-admin… key"
	if len(adminKeys) > 0 {
		admins = fmt.Sprintf("%d key(s), hidden", len(adminKeys))
	}
	faultList := make([]string, 0, len(faults))
	for _, f := range faults {
		faultList = append(faultList, fmt.Sprintf("%s:%g", f.Kind, f.Rate))
	}
	logger.Info("fake-anthropic config", "models", strings.Join(tier.Models, ","), "rpm", *rpm,
		"input_tpm", *inputTPM, "output_tpm", *outputTPM, "otpm_mode", *otpmMode,
		"count_cache_reads", *countCacheReads, "cache_min_tokens", *cacheMinTokens, "admin_keys", admins,
		"tokens_per_second", *tokensPerSecond, "latency", *latency, "reply_tokens", *replyTokens,
		"api_keys", keys, "faults", strings.Join(faultList, ","), "seed", *seed)
	fmt.Fprintf(stdout, "fake-anthropic listening on http://%s\n", ln.Addr())

	srv := &http.Server{
		Handler:           fake,
		ReadHeaderTimeout: readHeaderLimit,
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	select {
	case err := <-served:
		return fmt.Errorf("fake-anthropic: serve: %w", err)
	case <-ctx.Done():
	}

	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownBudget)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		// Streams still running after the budget are cut.
		logger.Warn("fake-anthropic: closing connections still open after the shutdown budget",
			"budget", shutdownBudget, "err", err)
		_ = srv.Close()
	}
	if err := <-served; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("fake-anthropic: serve: %w", err)
	}
	return nil
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
