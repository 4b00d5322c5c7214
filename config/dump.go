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
func (c *Config) Dump(w io.Writer) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	line := func(path string, format string, args ...any) {
		fmt.Fprintf(tw, "  %s\t%s\n", path, fmt.Sprintf(format, args...))
	}
	fmt.Fprintln(tw, "configuration:")
	line("listen", "%s", c.Listen)
	line("worker_listen", "%s", c.WorkerListen)
	line("redis_url", "%s", redactURL(c.RedisURL))
	line("redis.timeout", "%s", c.Redis.Timeout)
	line("redis.allow_evicting", "%t", c.Redis.AllowEvicting)
	line("redis.check_interval", "%s", c.Redis.CheckInterval)
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
	}
	for i, g := range c.ModelGroups {
		line(fmt.Sprintf("model_groups[%d]", i), "%s: %s; rpm %d, input_tpm %d, output_tpm %d, max_concurrency %d, count_cache_reads %t; output counted %s; outage after %d failures within %s, probes every %s to %s",
			g.Name, strings.Join(g.Models, ", "), g.RPM, g.InputTPM, g.OutputTPM, g.MaxConcurrency, g.CountCacheReads,
			g.OutputAccounting, g.OutageFailures, g.OutageWindow, g.ProbeInterval, g.ProbeIntervalMax)
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
	line("log.format", "%s", c.Log.Format)
	line("log.level", "%s", c.Log.Level)
	_ = tw.Flush()
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
	return u.Redacted()
}
