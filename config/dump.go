package config

import (
	"fmt"
	"io"
	"net/url"
	"strings"
	"text/tabwriter"
)

// Dump writes a human-readable summary of c, one setting a line under its
// path in the file, as printed at start. Secrets are hidden: the upstream key
// shows as "set" or "not set", other keys as the start of their digest, and
// passwords in URLs as "xxxxx".
func (c *Config) Dump(w io.Writer) { c.dump(w, nil) }

// Process is which parts of sluice one process runs (DumpFor).
type Process struct{ API, Worker bool }

// DumpFor is Dump for a process that runs p: an address the process does
// not listen on says so instead of showing a port nothing answers on (a
// worker that runs with the api, as in serve and dev, is served on listen).
func (c *Config) DumpFor(w io.Writer, p Process) { c.dump(w, &p) }

func (c *Config) dump(w io.Writer, p *Process) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	line := func(path string, format string, args ...any) {
		fmt.Fprintf(tw, "  %s\t%s\n", path, fmt.Sprintf(format, args...))
	}
	fmt.Fprintln(tw, "configuration:")
	listen, workerListen := c.listenLines(p)
	line("listen", "%s", listen)
	line("worker_listen", "%s", workerListen)
	line("redis_url", "%s", redactURL(c.RedisURL))
	line("redis.mode", "%s", c.Redis.Mode)
	line("redis.timeout", "%s", c.Redis.Timeout)
	line("redis.allow_evicting", "%t", c.Redis.AllowEvicting)
	line("redis.check_interval", "%s", c.Redis.CheckInterval)
	if c.Redis.WaitReplicas > 0 {
		line("redis.wait_replicas", "%d (WAIT up to %s after each admission, attempt start and job end)", c.Redis.WaitReplicas, c.Redis.WaitTimeout)
	} else {
		line("redis.wait_replicas", "0 (no WAIT)")
	}
	line("upstream.base_url", "%s", redactURL(c.Upstream.BaseURL))
	line("upstream.api_key", "%s", setOrNot(c.Upstream.APIKey))
	line("upstream.admin_key", "%s (the account's rate limits)", setOrNot(c.Upstream.AdminKey))
	line("upstream.attempt_timeout", "%s", c.Upstream.AttemptTimeout)
	line("upstream.max_attempts", "%d", c.Upstream.MaxAttempts)
	line("upstream.backoff_base", "%s", c.Upstream.BackoffBase)
	line("upstream.backoff_max", "%s", c.Upstream.BackoffMax)
	line("upstream.max_outage", "%s", c.Upstream.MaxOutage)
	line("upstream.first_byte_timeout", "%s", c.Upstream.FirstByteTimeout)
	if len(c.AdminKeys) == 0 {
		line("admin_keys", "none (admin routes disabled)")
	} else {
		line("admin_keys", "%s", shortKeys(c.AdminKeys))
	}
	for i, t := range c.Tenants {
		line(fmt.Sprintf("tenants[%d]", i), "%s: keys %s; default_max_tokens %d",
			t.Name, shortKeys(t.Keys), t.DefaultMaxTokens)
		for j, f := range t.Fallbacks {
			line(fmt.Sprintf("tenants[%d].fallbacks[%d]", i, j), "%s → %s when %s", f.From, strings.Join(f.To, ", then "), strings.Join(f.When, ", "))
		}
	}
	for i, g := range c.ModelGroups {
		line(fmt.Sprintf("model_groups[%d]", i), "%s: %s; rpm %d, input_tpm %d, output_tpm %d, max_concurrency %d, count_cache_reads %t, cache_hold %s; output counted %s; outage after %d failures within %s, probes every %s to %s",
			g.Name, strings.Join(g.Models, ", "), g.RPM, g.InputTPM, g.OutputTPM, g.MaxConcurrency, g.CountCacheReads, g.CacheHold,
			g.OutputAccounting, g.OutageFailures, g.OutageWindow, g.ProbeInterval, g.ProbeIntervalMax)
		if g.Batch {
			slack, window, maxJobs, after, poll := g.BatchSettings()
			line(fmt.Sprintf("model_groups[%d].batch", i), "on: background jobs with a deadline of %s or more go in batches of up to %d after %s; by the Messages API after %s without a batch; first status check after %s",
				slack, maxJobs, window, after, poll)
		}
	}
	line("api.body_limit_bytes", "%d", c.API.BodyLimitBytes)
	line("api.shutdown_timeout", "%s", c.API.ShutdownTimeout)
	line("api.read_header_timeout", "%s", c.API.ReadHeaderTimeout)
	line("api.body_timeout", "%s", c.API.BodyTimeout)
	line("api.idle_timeout", "%s", c.API.IdleTimeout)
	line("api.follower_lease", "%s", c.API.FollowerLease)
	line("worker.shutdown_timeout", "%s", c.Worker.ShutdownTimeout)
	line("worker.task_check_interval", "%s", c.Worker.TaskCheckInterval)
	line("metrics.require_admin_key", "%t", c.Metrics.RequireAdminKey)
	line("usage.hourly_retention", "%s", c.Usage.HourlyRetention)
	line("usage.daily_retention", "%s", c.Usage.DailyRetention)
	line("usage.prices", "%d entries; shipped price list %s", len(c.Usage.Prices), map[bool]string{true: "on", false: "off"}[c.Usage.ShippedPrices])
	line("log.format", "%s", c.Log.Format)
	line("log.level", "%s", c.Log.Level)
	_ = tw.Flush()
}

// listenLines are the values shown for listen and worker_listen: the
// addresses, or, for a process p, what is true of them there.
func (c *Config) listenLines(p *Process) (listen, workerListen string) {
	switch {
	case p == nil:
		return c.Listen, c.WorkerListen
	case p.API && p.Worker:
		return c.Listen + " (the api, and the worker's health and metrics)",
			"not used: the worker runs in the api's process and is served on listen"
	case p.API:
		return c.Listen, "not used: no worker in this process"
	case p.Worker:
		return "not used: no api in this process", c.WorkerListen + " (the worker's /healthz, /readyz and /metrics)"
	}
	return c.Listen, c.WorkerListen
}

func shortKeys(keys []Key) string {
	s := make([]string, len(keys))
	for i, k := range keys {
		s[i] = k.short()
	}
	return strings.Join(s, ", ")
}

func setOrNot(secret string) string {
	if secret == "" {
		return "not set"
	}
	return "set"
}

// redactURL hides the password in a URL; one that does not parse is not
// shown at all, since it might still hold one.
func redactURL(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		return "(invalid URL)"
	}
	// go-redis's Sentinel URLs give the primary's password as a parameter.
	if q := u.Query(); q.Has("password") || q.Has("sentinel_password") {
		for _, k := range []string{"password", "sentinel_password"} {
			if q.Has(k) {
				q.Set(k, "xxxxx")
			}
		}
		u.RawQuery = q.Encode()
	}
	return u.Redacted()
}
