package config

import (
	"errors"
	"fmt"
	"maps"
	"math"
	"net"
	"net/url"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

const maxNameLen = 64

var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]*$`)

// Validate checks the whole configuration and returns every problem found,
// joined with errors.Join, each prefixed with its path. It does not fill
// defaults: see Default and Load.
func (c *Config) Validate() error {
	ps := c.problems()
	errs := make([]error, len(ps))
	for i, p := range ps {
		errs[i] = p
	}
	return errors.Join(errs...)
}

// problems is every problem of c, section by section, in the order of the
// file.
func (c *Config) problems() []*fieldError {
	var v validator
	c.checkAddresses(&v)
	c.checkRedis(&v)
	c.checkUpstream(&v)
	keys := v.keyChecker()
	for i, k := range c.AdminKeys {
		keys(fmt.Sprintf("admin_keys[%d]", i), k)
	}
	c.checkTenants(&v, keys)
	c.checkModelGroups(&v)
	c.checkProcesses(&v)
	c.checkLog(&v)
	return v.errs
}

// checkAddresses: listen and worker_listen.
func (c *Config) checkAddresses(v *validator) {
	v.addr("listen", c.Listen)
	v.addr("worker_listen", c.WorkerListen)
}

// checkRedis: redis_url and the redis section.
func (c *Config) checkRedis(v *validator) {
	c.checkRedisURL(v)
	v.positiveDuration("redis.timeout", c.Redis.Timeout)
	v.positiveDuration("redis.check_interval", c.Redis.CheckInterval)
	c.checkRedisWait(v)
}

// checkRedisURL: redis.mode, and redis_url in that mode's form.
func (c *Config) checkRedisURL(v *validator) {
	mode := c.Redis.Mode
	switch mode {
	case RedisSingle, RedisSentinel, RedisCluster:
	default:
		v.add("redis.mode", `must be "single" (one Redis), "sentinel" (a primary found through Sentinel) or "cluster", got %q`, mode)
		mode = "" // the URL is still checked, as single's
	}
	if c.RedisURL == "" {
		v.add("redis_url", "required")
		return
	}
	switch mode {
	case RedisSentinel:
		o, err := redis.ParseFailoverURL(c.RedisURL)
		switch {
		case err != nil:
			v.add("redis_url", "not a valid Redis Sentinel URL (redis.mode is sentinel): want the sentinels, redis://SENTINEL:26379/0?addr=SENTINEL2:26379&addr=SENTINEL3:26379&master_name=NAME (rediss:// for TLS): %s", urlErr(err))
		case o.MasterName == "":
			v.add("redis_url", "redis.mode is sentinel but the URL names no master: add ?master_name=NAME (the name in the sentinels' \"sentinel monitor NAME …\" line)")
		}
	case RedisCluster:
		if _, err := redis.ParseClusterURL(c.RedisURL); err != nil {
			v.add("redis_url", "not a valid Redis Cluster URL (redis.mode is cluster): want seed nodes, redis://NODE:7000?addr=NODE2:7001 (rediss:// for TLS): %s", urlErr(err))
		} else if u, perr := url.Parse(c.RedisURL); perr == nil && strings.Trim(u.Path, "/") != "" && strings.Trim(u.Path, "/") != "0" {
			v.add("redis_url", "redis.mode is cluster, and Redis Cluster has database 0 only: drop %q from the URL's end", u.Path)
		}
	default:
		if u, perr := url.Parse(c.RedisURL); perr == nil && mode == RedisSingle && (u.Query().Has("master_name") || u.Query().Has("addr")) {
			v.add("redis_url", "the URL has master_name or addr, as a Sentinel or Cluster URL does, but redis.mode is single: set redis.mode (REDIS_MODE) to sentinel or cluster")
		} else if _, err := redis.ParseURL(c.RedisURL); err != nil {
			v.add("redis_url", "not a valid Redis URL (redis://host:port/db, rediss:// or unix://): %s", urlErr(err))
		}
	}
}

// checkRedisWait: redis.wait_replicas and redis.wait_timeout.
func (c *Config) checkRedisWait(v *validator) {
	r := c.Redis
	if r.WaitReplicas < 0 {
		v.add("redis.wait_replicas", "must be ≥ 0 (0 means no WAIT), got %d", r.WaitReplicas)
	}
	if r.WaitReplicas == 0 {
		return
	}
	switch {
	case r.WaitTimeout <= 0:
		v.add("redis.wait_timeout", "must be > 0 while redis.wait_replicas is set (a WAIT without a timeout blocks until the replicas answer, for ever if they are gone), got %s", r.WaitTimeout)
	case r.Timeout > 0 && r.WaitTimeout >= r.Timeout:
		v.add("redis.wait_timeout", "must be less than redis.timeout (%s): the script and its WAIT are one call bounded by it; got %s", r.Timeout, r.WaitTimeout)
	}
}

// checkUpstream: the upstream section.
func (c *Config) checkUpstream(v *validator) {
	u := c.Upstream
	v.baseURL("upstream.base_url", u.BaseURL)
	v.positiveDuration("upstream.attempt_timeout", u.AttemptTimeout)
	v.positive("upstream.max_attempts", int64(u.MaxAttempts))
	v.positiveDuration("upstream.backoff_base", u.BackoffBase)
	v.positiveDuration("upstream.backoff_max", u.BackoffMax)
	if u.BackoffBase > 0 && u.BackoffMax > 0 && u.BackoffMax < u.BackoffBase {
		v.add("upstream.backoff_max", "must not be less than upstream.backoff_base (%s)", u.BackoffBase)
	}
	v.positiveDuration("upstream.max_outage", u.MaxOutage)
	v.positiveDuration("upstream.first_byte_timeout", u.FirstByteTimeout)
}

// keyChecker returns a check of one admin or tenant key at a path. Keys are
// unique across admins and tenants: a shared key would make one tenant's
// requests another's, or give a tenant admin rights.
func (v *validator) keyChecker() func(path string, k Key) {
	seen := map[[32]byte]string{}
	return func(p string, k Key) {
		if msg := k.check(); msg != "" {
			v.add(p, "%s", msg)
			return
		}
		if first, dup := seen[k.digest]; dup {
			v.add(p, "same key as %s; every key must be unique", first)
			return
		}
		seen[k.digest] = p
	}
}

// checkTenants: the tenants, their keys (with keys, shared with the admin
// keys' check) and their users.
func (c *Config) checkTenants(v *validator, keys func(string, Key)) {
	if len(c.Tenants) == 0 {
		v.add("tenants", "at least one tenant is required")
	}
	names := map[string]string{}
	for i, t := range c.Tenants {
		p := fmt.Sprintf("tenants[%d]", i)
		v.name(p+".name", t.Name, names)
		if len(t.Keys) == 0 {
			v.add(p+".keys", "at least one key is required")
		}
		for j, k := range t.Keys {
			keys(fmt.Sprintf("%s.keys[%d]", p, j), k)
		}
		v.positive(p+".default_max_tokens", int64(t.DefaultMaxTokens))
		if !(t.Weight > 0) {
			v.add(p+".weight", "must be > 0")
		}
		v.nonNegative(p+".max_tokens_cap", int64(t.MaxTokensCap))
		switch t.MaxTokensPolicy {
		case "clamp", "reject":
		default:
			v.add(p+".max_tokens_policy", `must be "clamp" or "reject", got %q`, t.MaxTokensPolicy)
		}
		v.nonNegative(p+".max_body_bytes", t.MaxBodyBytes)
		v.positive(p+".max_messages", int64(t.MaxMessages))
		v.nonNegative(p+".max_input_tokens", int64(t.MaxInputTokens))
		if t.MaxWait < 0 {
			v.add(p+".max_wait", "must be ≥ 0 (0 means no limit)")
		}
		v.dollars(p+".tenant_budget_usd_per_day", t.TenantBudgetUSDPerDay)
		v.dollars(p+".tenant_budget_usd_per_month", t.TenantBudgetUSDPerMonth)
		v.userPolicy(p, t.UserPolicy, false)
		v.users(p, t.Users)
		c.checkFallbacks(v, p, t.Fallbacks)
	}
}

// checkFallbacks checks a tenant's fallback rules (p is the tenant's
// path): known groups and models, no rule that falls back to its own
// group, one rule per group, known reasons, and no cycle among the rules.
func (c *Config) checkFallbacks(v *validator, p string, rules []Fallback) {
	groups := strings.Join(c.GroupNames(), ", ")
	first := map[string]string{}
	edges := map[string][]string{} // group → the groups its rule falls back to
	for i, f := range rules {
		fp := fmt.Sprintf("%s.fallbacks[%d]", p, i)
		fromOK := false
		switch _, known := c.group(f.From); {
		case f.From == "":
			v.add(fp+".from", "required: the model group whose requests may fall back (one of %s)", groups)
		case !known:
			if g, ok := c.GroupFor(f.From); ok {
				v.add(fp+".from", "%q is a model, not a model group: write the group that serves it, %q", f.From, g.Name)
			} else {
				v.add(fp+".from", "unknown model group %q; the groups are %s", f.From, groups)
			}
		default:
			if prev, dup := first[f.From]; dup {
				v.add(fp+".from", "%q already has a fallback rule at %s; put every fallback of a group in one rule's to list, in the order to try them", f.From, prev)
			} else {
				first[f.From] = fp
				fromOK = true
			}
		}
		if len(f.To) == 0 {
			v.add(fp+".to", "at least one fallback is required: a model group's name, or a model that a group serves")
		}
		seen := map[string]string{}
		for j, name := range f.To {
			tp := fmt.Sprintf("%s.to[%d]", fp, j)
			g, _, err := c.FallbackTarget(name)
			switch {
			case g != nil && g.Name == f.From && name == f.From:
				v.add(tp, "a group cannot fall back to itself: %q is the group this rule falls back from", name)
				continue
			case g != nil && g.Name == f.From:
				v.add(tp, "%q is served by model group %q, the group this rule falls back from; a group cannot fall back to itself", name, f.From)
				continue
			case errors.Is(err, ErrPatternsOnly):
				v.add(tp, "model group %q lists only patterns (%s), so it names no model to run: write the model to use instead, such as %q", name, strings.Join(g.Models, ", "), strings.ReplaceAll(g.Models[0], "*", "4-5"))
				continue
			case err != nil:
				v.add(tp, "%q is %v; the groups are %s", name, err, groups)
				continue
			}
			if prev, dup := seen[g.Name]; dup {
				v.add(tp, "model group %q is already a fallback at %s; a group is tried once", g.Name, prev)
				continue
			}
			seen[g.Name] = tp
			if fromOK {
				edges[f.From] = append(edges[f.From], g.Name)
			}
		}
		v.fallbackWhen(fp+".when", f.When)
	}
	for i, f := range rules {
		if cycle := fallbackCycle(edges, f.From); cycle != nil && first[f.From] == fmt.Sprintf("%s.fallbacks[%d]", p, i) && cycle[0] == slices.Min(cycle[:len(cycle)-1]) {
			v.add(fmt.Sprintf("%s.fallbacks[%d]", p, i), "the fallbacks form a cycle, %s: a group that takes another's requests must not send its own back, or two busy groups would trade requests; remove one direction", strings.Join(cycle, " → "))
		}
	}
}

// fallbackWhen checks a rule's when.
func (v *validator) fallbackWhen(p string, when []string) {
	if len(when) == 0 {
		v.add(p, "required: list when to fall back, on_wait (the wait is longer than max_wait) and/or on_outage (the group is in outage), or [never]")
		return
	}
	seen := map[string]bool{}
	for j, w := range when {
		switch w {
		case FallbackOnWait, FallbackOnOutage:
		case FallbackNever:
			if len(when) > 1 {
				v.add(fmt.Sprintf("%s[%d]", p, j), "never turns the rule off, so it cannot be listed with other reasons")
			}
		default:
			v.add(fmt.Sprintf("%s[%d]", p, j), "unknown reason %q: use on_wait, on_outage or never", w)
			continue
		}
		if seen[w] {
			v.add(fmt.Sprintf("%s[%d]", p, j), "%q is listed twice", w)
		}
		seen[w] = true
	}
}

// fallbackCycle is a cycle through start in the fallback graph, as the
// groups along it with start at both ends; nil when there is none.
func fallbackCycle(edges map[string][]string, start string) []string {
	var path []string
	onPath := map[string]bool{}
	var walk func(g string) []string
	walk = func(g string) []string {
		path = append(path, g)
		onPath[g] = true
		for _, n := range edges[g] {
			if n == start {
				return append(slices.Clone(path), start)
			}
			if !onPath[n] {
				if c := walk(n); c != nil {
					return c
				}
			}
		}
		path = path[:len(path)-1]
		onPath[g] = false
		return nil
	}
	return walk(start)
}

// group is the model group named name.
func (c *Config) group(name string) (*ModelGroup, bool) {
	for i := range c.ModelGroups {
		if c.ModelGroups[i].Name == name {
			return &c.ModelGroups[i], true
		}
	}
	return nil, false
}

// dollars checks a budget: a finite amount ≥ 0 (0 means none).
func (v *validator) dollars(p string, usd float64) {
	if usd < 0 || math.IsNaN(usd) || math.IsInf(usd, 0) {
		v.add(p, "must be an amount of US dollars ≥ 0 (0 means no budget), got %v", usd)
	}
}

// userPolicy checks a tenant's per-user defaults (p is the tenant's path)
// or, override set, one user's overrides (p is the user's path).
func (v *validator) userPolicy(p string, o UserPolicy, override bool) {
	if override && o.Weight < 0 {
		v.add(p+".weight", "must be > 0")
	}
	v.nonNegative(p+".requests_per_hour", int64(o.RequestsPerHour))
	v.nonNegative(p+".tokens_per_hour", int64(o.TokensPerHour))
	v.nonNegative(p+".max_queued", int64(o.MaxQueued))
	v.dollars(p+".budget_usd_per_day", o.BudgetUSDPerDay)
	v.dollars(p+".budget_usd_per_month", o.BudgetUSDPerMonth)
	for i, c := range o.Classes {
		if c != ClassInteractive && c != ClassBackground {
			v.add(fmt.Sprintf("%s.classes[%d]", p, i), "must be %q or %q, not %q", ClassInteractive, ClassBackground, c)
		}
	}
}

// users checks a tenant's users: (p is the tenant's path): every key a user
// id (NormalizeUserID), no two the same user once normalised, and each
// user's overrides.
func (v *validator) users(p string, users map[string]UserPolicy) {
	seen := map[string]string{}
	for _, u := range slices.Sorted(maps.Keys(users)) {
		up := fmt.Sprintf("%s.users[%q]", p, u)
		n, err := NormalizeUserID(u)
		if err != nil {
			v.add(up, "not a user id: it %v", err)
		} else if first, dup := seen[n]; dup {
			v.add(up, "the same user as %s (user ids are compared in Unicode NFC)", first)
		} else {
			seen[n] = up
		}
		v.userPolicy(up, users[u], true)
	}
}

// normalizeUsers rewrites the keys of every tenant's users: in NFC, the
// form the api looks them up in (NormalizeUserID). Keys that are not user
// ids are left as they are: validation reports them.
func (c *Config) normalizeUsers() {
	for i := range c.Tenants {
		t := &c.Tenants[i]
		if len(t.Users) == 0 {
			continue
		}
		users := make(map[string]UserPolicy, len(t.Users))
		for u, o := range t.Users {
			if n, err := NormalizeUserID(u); err == nil {
				u = n
			}
			users[u] = o
		}
		t.Users = users
	}
}

// checkModelGroups: the model groups, and that each model name or pattern
// belongs to one group (listed twice, the second would never be used:
// GroupFor takes the first).
func (c *Config) checkModelGroups(v *validator) {
	if len(c.ModelGroups) == 0 {
		v.add("model_groups", "at least one model group is required")
	}
	names := map[string]string{}
	seenModel := map[string]string{}
	for i, g := range c.ModelGroups {
		p := fmt.Sprintf("model_groups[%d]", i)
		v.name(p+".name", g.Name, names)
		v.models(p, g.Models, seenModel)
		v.groupLimits(p, g)
	}
}

// models checks a group's models (p is the group's path); seen holds the
// names and patterns of the groups before it.
func (v *validator) models(p string, models []string, seen map[string]string) {
	if len(models) == 0 {
		v.add(p+".models", "at least one model name or pattern is required")
	}
	for j, m := range models {
		mp := fmt.Sprintf("%s.models[%d]", p, j)
		switch _, err := path.Match(m, ""); {
		case strings.TrimSpace(m) == "":
			v.add(mp, "must not be empty")
		case err != nil:
			v.add(mp, "%q is not a valid pattern (see Go's path.Match: *, ?, [a-z], \\ to escape)", m)
		default:
			if first, dup := seen[m]; dup {
				v.add(mp, "%q is already listed at %s", m, first)
			} else {
				seen[m] = mp
			}
		}
	}
}

// groupLimits checks a group's limits, outage detection and accounting (p
// is the group's path).
func (v *validator) groupLimits(p string, g ModelGroup) {
	v.positive(p+".rpm", int64(g.RPM))
	v.positive(p+".input_tpm", int64(g.InputTPM))
	v.positive(p+".output_tpm", int64(g.OutputTPM))
	v.positive(p+".max_concurrency", int64(g.MaxConcurrency))
	v.positiveDuration(p+".burst", g.Burst)
	v.positive(p+".outage_failures", int64(g.OutageFailures))
	v.positiveDuration(p+".outage_window", g.OutageWindow)
	v.positiveDuration(p+".probe_interval", g.ProbeInterval)
	v.positiveDuration(p+".probe_interval_max", g.ProbeIntervalMax)
	if g.CacheHold < 0 {
		v.add(p+".cache_hold", "must be 0 (no hold) or a positive duration such as 10s, not %s", g.CacheHold)
	}
	if !(g.BackgroundMinShare >= 0 && g.BackgroundMinShare <= 1) {
		v.add(p+".background_min_share", "must be a share from 0 (interactive jobs always first) to 1, such as 0.1, not %v", g.BackgroundMinShare)
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"batch_slack", g.BatchSlack}, {"batch_window", g.BatchWindow}, {"batch_fallback_after", g.BatchFallbackAfter}, {"batch_poll", g.BatchPoll}} {
		if d.v < 0 {
			v.add(p+"."+d.name, "must be a positive duration (or left out for the default), not %s", d.v)
		}
	}
	if g.BatchMaxJobs < 0 || g.BatchMaxJobs > 100000 {
		v.add(p+".batch_max_jobs", "must be from 1 to 100000 (the Batches API's cap on one batch), not %d", g.BatchMaxJobs)
	}
	if slack, window, _, after, _ := g.BatchSettings(); g.Batch && (after >= slack || after <= window) {
		v.add(p+".batch_fallback_after", "must be longer than batch_window (%s) and shorter than batch_slack (%s), so that a job the Batches API could not take still has time to run, not %s", window, slack, after)
	}
	if g.OutputAccounting != "" && g.OutputAccounting != OutputProduced && g.OutputAccounting != OutputReserved {
		v.add(p+".output_accounting", "must be %q (output counted as it is produced: the current rule) or %q (max_tokens reserved at the start: the older rule), not %q", OutputProduced, OutputReserved, g.OutputAccounting)
	}
	if g.ProbeInterval > 0 && g.ProbeIntervalMax > 0 && g.ProbeIntervalMax < g.ProbeInterval {
		v.add(p+".probe_interval_max", "must not be less than probe_interval (%s)", g.ProbeInterval)
	}
}

// checkProcesses: the api, worker and usage sections.
func (c *Config) checkProcesses(v *validator) {
	v.positive("api.body_limit_bytes", c.API.BodyLimitBytes)
	v.positiveDuration("api.shutdown_timeout", c.API.ShutdownTimeout)
	v.positiveDuration("api.read_header_timeout", c.API.ReadHeaderTimeout)
	v.positiveDuration("api.body_timeout", c.API.BodyTimeout)
	v.positiveDuration("api.idle_timeout", c.API.IdleTimeout)
	v.positiveDuration("api.follower_lease", c.API.FollowerLease)
	v.positiveDuration("worker.shutdown_timeout", c.Worker.ShutdownTimeout)
	v.positiveDuration("worker.task_check_interval", c.Worker.TaskCheckInterval)
	v.positiveDuration("worker.lease_ttl", c.Worker.LeaseTTL)
	if c.Usage.HourlyRetention < time.Hour {
		v.add("usage.hourly_retention", "must be at least 1h, got %s", c.Usage.HourlyRetention)
	}
	if c.Usage.DailyRetention < 24*time.Hour {
		v.add("usage.daily_retention", "must be at least 24h, got %s", c.Usage.DailyRetention)
	}
	seen := map[string]string{}
	for i, m := range c.Usage.Prices {
		p := fmt.Sprintf("usage.prices[%d]", i)
		v.models(p, m.Models, seen)
		for _, f := range []struct {
			name string
			v    *float64
		}{{"input", &m.Input}, {"output", &m.Output}, {"cache_write_5m", m.CacheWrite5m}, {"cache_write_1h", m.CacheWrite1h}, {"cache_read", m.CacheRead}} {
			if f.v != nil && (*f.v < 0 || math.IsNaN(*f.v) || math.IsInf(*f.v, 0)) {
				v.add(p+"."+f.name, "must be a price of 0 or more dollars per million tokens, got %v", *f.v)
			}
		}
		if d := m.BatchDiscount; d != nil && !(*d >= 0 && *d <= 1) {
			v.add(p+".batch_discount", "must be between 0 and 1 (0.5 = half price), got %v", *d)
		}
	}
}

// checkLog: the log section.
func (c *Config) checkLog(v *validator) {
	switch c.Log.Format {
	case "text", "json":
	default:
		v.add("log.format", `must be "text" or "json", got %q`, c.Log.Format)
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		v.add("log.level", "must be one of debug, info, warn, error, got %q", c.Log.Level)
	}
}

type validator struct{ errs []*fieldError }

func (v *validator) add(path, format string, args ...any) {
	v.errs = append(v.errs, &fieldError{Path: path, Msg: fmt.Sprintf(format, args...)})
}

func (v *validator) positive(path string, n int64) {
	if n <= 0 {
		v.add(path, "must be > 0")
	}
}

func (v *validator) nonNegative(path string, n int64) {
	if n < 0 {
		v.add(path, "must be ≥ 0 (0 means no limit)")
	}
}

func (v *validator) positiveDuration(path string, d time.Duration) {
	if d <= 0 {
		v.add(path, "must be > 0")
	}
}

// addr checks a listen address: host:port, the host optional, the port a
// number (0 picks a free one).
func (v *validator) addr(path, a string) {
	_, port, err := net.SplitHostPort(a)
	if err == nil {
		_, err = strconv.ParseUint(port, 10, 16)
	}
	if err != nil {
		v.add(path, `want host:port such as ":8080" or "127.0.0.1:8080", got %q`, a)
	}
}

func (v *validator) baseURL(path, s string) {
	u, err := url.Parse(s)
	switch {
	case err != nil:
		v.add(path, "not a valid URL: %s", urlErr(err))
	case (u.Scheme != "http" && u.Scheme != "https") || u.Host == "":
		v.add(path, `want an absolute http or https URL such as "https://api.anthropic.com", got %q`, u.Redacted())
	}
}

// name checks a tenant or group name and that it is the first of its kind.
func (v *validator) name(path, n string, seen map[string]string) {
	switch {
	case n == "":
		v.add(path, "required")
	case len(n) > maxNameLen:
		v.add(path, "must be at most %d characters, got %d", maxNameLen, len(n))
	case !nameRE.MatchString(n):
		v.add(path, "must be lowercase letters, digits, '_' and '-', starting with a letter or digit; got %q", n)
	default:
		if first, dup := seen[n]; dup {
			v.add(path, "%q is already the name at %s", n, first)
			return
		}
		seen[n] = path
	}
}

// urlErr drops the URL from a url.Error: it may hold a password.
func urlErr(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// isPattern reports whether a model entry is a path.Match pattern rather
// than an exact name.
func isPattern(m string) bool { return strings.ContainsAny(m, `*?[\`) }
