// Package config is sluice's configuration: one YAML file plus environment
// overrides, read once at start.
//
// Precedence is environment, then file, then the defaults below. A field the
// file leaves out (or leaves empty) takes its default; a field the file sets is
// used as given, so `rpm: 0` is reported as an error rather than quietly
// replaced. Secrets come only from the environment: the upstream API key is
// never read from the file. Tenant and admin keys may be written hashed
// ("sha256:<hex>"), and the config only ever keeps their digests.
//
// Load and Parse report every problem at once (errors.Join), each prefixed
// with its path in the file, such as `model_groups[1].rpm: must be > 0`.
//
// This package and cmd/sluice are the only readers of the environment, and
// this package reads it only through the getenv function it is given.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"slices"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/sluice-dev/sluice/pricing"
)

// Defaults. Every field that has a default takes it from one of these.
const (
	DefaultListen            = ":8080"
	DefaultWorkerListen      = ":8081"
	DefaultRedisURL          = "redis://127.0.0.1:6379/0"
	DefaultUpstreamBaseURL   = "https://api.anthropic.com"
	DefaultAttemptTimeout    = 10 * time.Minute
	DefaultMaxAttempts       = 4
	DefaultBackoffBase       = time.Second
	DefaultBackoffMax        = 30 * time.Second
	DefaultMaxOutage         = 15 * time.Minute
	DefaultFirstByteTimeout  = 2 * time.Minute
	DefaultOutageFailures    = 5
	DefaultOutageWindow      = 30 * time.Second
	DefaultProbeInterval     = time.Second
	DefaultProbeIntervalMax  = 30 * time.Second
	DefaultMaxTokens         = 1024
	DefaultMaxConcurrency    = 8
	DefaultBurst             = 3 * time.Second
	DefaultWeight            = 1.0
	DefaultMaxMessages       = 1000
	DefaultMaxQueued         = 50
	DefaultMaxWait           = 15 * time.Minute
	DefaultMaxTokensPolicy   = "clamp"
	DefaultOutputAccounting  = OutputProduced
	DefaultCacheHold         = 10 * time.Second
	DefaultBackgroundShare   = 0.10
	DefaultBodyLimitBytes    = 8 << 20 // 8 MiB
	DefaultAPIShutdown       = 10 * time.Second
	DefaultWorkerShutdown    = 25 * time.Second
	DefaultTaskCheckInterval = 2 * time.Millisecond
	DefaultHourlyRetention   = 7 * 24 * time.Hour
	DefaultDailyRetention    = 400 * 24 * time.Hour
	DefaultLeaseTTL          = 15 * time.Second
	DefaultRedisTimeout      = 2 * time.Second
	DefaultRedisCheck        = 30 * time.Second
	DefaultRedisMode         = RedisSingle
	DefaultRedisWaitTimeout  = time.Second
	DefaultReadHeaderTimeout = 10 * time.Second
	DefaultBodyTimeout       = 30 * time.Second
	DefaultIdleTimeout       = 2 * time.Minute
	DefaultFollowerLease     = 30 * time.Second
	DefaultLogFormat         = "text"
	DefaultLogLevel          = "info"
)

// Environment variables read by Load and Parse. Each one, when set and not
// empty, beats the file.
const (
	envListen       = "SLUICE_LISTEN"
	envWorkerListen = "SLUICE_WORKER_LISTEN"
	envRedisURL     = "REDIS_URL"
	envRedisMode    = "REDIS_MODE"
	envBaseURL      = "ANTHROPIC_BASE_URL"
	envAPIKey       = "ANTHROPIC_API_KEY"
	envAdminKey     = "SLUICE_ADMIN_KEY"
	envLogFormat    = "SLUICE_LOG_FORMAT"
	envLogLevel     = "SLUICE_LOG_LEVEL"
	envAllowEvict   = "SLUICE_ALLOW_EVICTING_REDIS"
	envAdminAPIKey  = "ANTHROPIC_ADMIN_KEY"
)

// Config is the whole configuration of a sluice process.
type Config struct {
	// Listen is the api's HTTP address, host:port. Default ":8080"; env SLUICE_LISTEN.
	Listen string `yaml:"listen"`
	// WorkerListen is the worker's health endpoint address, host:port.
	// Default ":8081"; env SLUICE_WORKER_LISTEN.
	WorkerListen string `yaml:"worker_listen"`
	// RedisURL locates the Redis that holds jobs, queues and limiter state,
	// in go-redis's URL form for redis.mode: single, redis://[user:pass@]host:port/db
	// (rediss:// for TLS, or unix://); sentinel, the sentinels with
	// master_name (redis.ParseFailoverURL); cluster, seed nodes
	// (redis.ParseClusterURL). Default "redis://127.0.0.1:6379/0"; env REDIS_URL.
	RedisURL string `yaml:"redis_url"`
	// Redis tunes how sluice uses that Redis.
	Redis    Redis    `yaml:"redis"`
	Upstream Upstream `yaml:"upstream"`
	// AdminKeys open /monitoring/, /dashboard and the admin routes. Empty
	// (the default) disables them. Env SLUICE_ADMIN_KEY adds one.
	AdminKeys []Key `yaml:"admin_keys"`
	// Tenants are the apps allowed to use sluice. At least one.
	Tenants []Tenant `yaml:"tenants"`
	// ModelGroups are the upstream models, grouped by shared rate limits. At least one.
	ModelGroups []ModelGroup `yaml:"model_groups"`
	API         API          `yaml:"api"`
	Worker      Worker       `yaml:"worker"`
	Log         Log          `yaml:"log"`
	Metrics     Metrics      `yaml:"metrics"`
	Usage       Usage        `yaml:"usage"`
}

// Metrics configures the Prometheus endpoint /metrics.
type Metrics struct {
	// RequireAdminKey makes /metrics need an admin key (Prometheus sends it
	// with authorization: {credentials: …}). Default false: open to
	// scrapers, as no metric names a user.
	RequireAdminKey bool `yaml:"require_admin_key"`
}

// Usage configures the usage statistics (GET /v1/admin/usage, /dashboard).
type Usage struct {
	// HourlyRetention is how long per-hour statistics are kept. Default
	// 168h (7 days); at least 1h.
	HourlyRetention time.Duration `yaml:"hourly_retention"`
	// DailyRetention is how long per-day statistics are kept. Default
	// 9600h (400 days); at least 24h.
	DailyRetention time.Duration `yaml:"daily_retention"`
	// Prices are the prices, in US dollars per million tokens, that usage
	// is costed with, for the models they match; they win over the
	// shipped list.
	Prices []ModelPrice `yaml:"prices,omitempty"`
	// ShippedPrices costs the models Prices does not match with the price
	// list sluice ships (the Claude API's published prices). Default true.
	ShippedPrices bool `yaml:"shipped_prices"`
}

// ModelPrice is the price of the models its patterns match, in US dollars
// per million tokens. The cache and batch prices default to the Claude
// API's usual multiples of Input.
type ModelPrice struct {
	// Models are exact model names or path.Match patterns; the longest
	// pattern that matches a model wins.
	Models []string `yaml:"models"`
	Input  float64  `yaml:"input"`
	Output float64  `yaml:"output"`
	// CacheWrite5m is a cache write of the default 5-minute lifetime.
	// Default 1.25 × Input.
	CacheWrite5m *float64 `yaml:"cache_write_5m"`
	// CacheWrite1h is a cache write of the 1-hour lifetime. Default 2 × Input.
	CacheWrite1h *float64 `yaml:"cache_write_1h"`
	// CacheRead is a cache hit or refresh. Default 0.1 × Input.
	CacheRead *float64 `yaml:"cache_read"`
	// BatchDiscount is what the Message Batches API takes off, 0 to 1.
	// Default 0.5.
	BatchDiscount *float64 `yaml:"batch_discount"`
}

// PriceTable is the price list usage is costed with: Usage.Prices over
// the shipped list (unless Usage.ShippedPrices is off).
func (c *Config) PriceTable() *pricing.Table {
	or := func(v *float64, def float64) float64 {
		if v != nil {
			return *v
		}
		return def
	}
	var entries []pricing.Entry
	for _, m := range c.Usage.Prices {
		entries = append(entries, pricing.Entry{Models: m.Models, Price: pricing.Price{
			Input: m.Input, Output: m.Output,
			CacheWrite5m: or(m.CacheWrite5m, m.Input*1.25), CacheWrite1h: or(m.CacheWrite1h, m.Input*2),
			CacheRead: or(m.CacheRead, m.Input/10), BatchDiscount: or(m.BatchDiscount, 0.5),
		}})
	}
	return pricing.NewTable(entries, c.Usage.ShippedPrices)
}

// Redis connection modes (Redis.Mode).
const (
	RedisSingle   = "single"   // one Redis (or a primary at a fixed address)
	RedisSentinel = "sentinel" // a primary found, and followed, through Sentinel
	RedisCluster  = "cluster"  // Redis Cluster: seed nodes; each model group in one hash slot
)

// Redis tunes how sluice uses its Redis.
type Redis struct {
	// Mode is how redis_url is read: single, sentinel or cluster. Default
	// single; env REDIS_MODE.
	Mode string `yaml:"mode"`
	// WaitReplicas, when > 0, follows each admission and each job's end
	// with WAIT WaitReplicas WaitTimeout on the same connection, so that
	// an acknowledged job survives a failover to a replica. Fewer replicas
	// in time is logged and counted, not refused. Default 0 (no WAIT).
	WaitReplicas int `yaml:"wait_replicas"`
	// WaitTimeout bounds that WAIT. Default 1s; less than Timeout.
	WaitTimeout time.Duration `yaml:"wait_timeout"`
	// Timeout bounds each Redis call: connecting, sending and waiting for
	// the answer. A Redis that does not answer within it is treated as
	// away: requests get a 503 with Retry-After at once instead of hanging.
	// Default 2s.
	Timeout time.Duration `yaml:"timeout"`
	// AllowEvicting lets sluice start on a Redis whose maxmemory-policy is
	// not noeviction. Such a Redis deletes keys when it fills up: accepted
	// jobs, queues and limiter state vanish. Default false: sluice refuses
	// to start; env SLUICE_ALLOW_EVICTING_REDIS=true or the flag
	// --allow-evicting-redis overrides (with a warning, and /readyz failing).
	AllowEvicting bool `yaml:"allow_evicting"`
	// CheckInterval is how often the eviction policy and memory use are
	// read again while running. Default 30s.
	CheckInterval time.Duration `yaml:"check_interval"`
}

// Upstream is the Anthropic API that sluice forwards to.
type Upstream struct {
	// BaseURL is an absolute http(s) URL. Default "https://api.anthropic.com";
	// env ANTHROPIC_BASE_URL.
	BaseURL string `yaml:"base_url"`
	// APIKey comes only from env ANTHROPIC_API_KEY, never from the file (an
	// api_key field there is an error). Empty means not set.
	APIKey string `yaml:"-" json:"-"`
	// AdminKey is an Anthropic Admin API key, only ever from env
	// ANTHROPIC_ADMIN_KEY: with it, workers read the account's rate limits
	// at start and every 10 minutes and use the lower of those and the
	// configured ones. Empty (the default): the configured limits only.
	AdminKey string `yaml:"-" json:"-"`
	// AttemptTimeout bounds one upstream call, streaming included. Default 10m.
	AttemptTimeout time.Duration `yaml:"attempt_timeout"`
	// MaxAttempts is how many failed attempts a job may have before it fails;
	// waits for rate limits do not count. Default 4.
	MaxAttempts int `yaml:"max_attempts"`
	// BackoffBase is the delay before the first retry after a failure; it
	// doubles on each further retry, with full jitter. Default 1s.
	BackoffBase time.Duration `yaml:"backoff_base"`
	// BackoffMax caps the retry delay. Default 30s.
	BackoffMax time.Duration `yaml:"backoff_max"`
	// MaxOutage is how long a model group may stay in outage (the upstream
	// unreachable or failing every call) before its waiting jobs fail with
	// upstream_unavailable and new jobs for it are refused with a 503; a
	// shorter outage only holds them. Default 15m.
	MaxOutage time.Duration `yaml:"max_outage"`
	// FirstByteTimeout bounds the wait for the upstream's answer to begin;
	// longer is a failure of the upstream, like a refused connection.
	// Default 2m.
	FirstByteTimeout time.Duration `yaml:"first_byte_timeout"`
}

// String describes u without its API key, so that printing a Config with
// %v or %+v never shows the secret.
func (u Upstream) String() string {
	return fmt.Sprintf("{BaseURL:%s APIKey:%s AdminKey:%s AttemptTimeout:%s MaxAttempts:%d BackoffBase:%s BackoffMax:%s MaxOutage:%s FirstByteTimeout:%s}",
		redactURL(u.BaseURL), setOrNot(u.APIKey), setOrNot(u.AdminKey), u.AttemptTimeout, u.MaxAttempts, u.BackoffBase, u.BackoffMax, u.MaxOutage, u.FirstByteTimeout)
}

// Tenant is one app that uses sluice on behalf of its users.
type Tenant struct {
	// Name is unique, [a-z0-9][a-z0-9_-]*, at most 64 characters. Required.
	Name string `yaml:"name"`
	// Keys are the tenant's API keys, plain or "sha256:<hex>". At least one.
	Keys []Key `yaml:"keys"`
	// DefaultMaxTokens is the max_tokens of a request that gives none, in
	// tokens. Default 1024.
	DefaultMaxTokens int `yaml:"default_max_tokens"`
	// MaxTokensCap caps a request's max_tokens, in tokens; 0 (the default)
	// means no cap beyond the model group's output limit.
	MaxTokensCap int `yaml:"max_tokens_cap"`
	// MaxTokensPolicy says what happens to a request above MaxTokensCap:
	// "clamp" (the default: the job runs with the cap, and shows it) or
	// "reject" (a 400 naming the cap).
	MaxTokensPolicy string `yaml:"max_tokens_policy"`
	// MaxBodyBytes is the largest request body this tenant may send, in
	// bytes; 0 (the default) means api.body_limit_bytes.
	MaxBodyBytes int64 `yaml:"max_body_bytes"`
	// MaxMessages is the most messages one request may hold. Default 1000.
	MaxMessages int `yaml:"max_messages"`
	// MaxInputTokens is the largest estimated input of one request, in
	// tokens; 0 (the default) means the model group's input limit.
	MaxInputTokens int `yaml:"max_input_tokens"`
	// MaxWait refuses a new job (503 overloaded) when its estimated wait at
	// admission is longer; 0 means no limit. Default 15m.
	MaxWait time.Duration `yaml:"max_wait"`
	// TenantBudgetUSDPerDay and TenantBudgetUSDPerMonth cap what all the
	// tenant's users together may spend, in US dollars per UTC day and per
	// UTC month, at usage.prices; 0 (the default) means no cap.
	TenantBudgetUSDPerDay   float64 `yaml:"tenant_budget_usd_per_day,omitempty"`
	TenantBudgetUSDPerMonth float64 `yaml:"tenant_budget_usd_per_month,omitempty"`

	// Fallbacks are the tenant's model fallbacks: which other model groups
	// take a request when the group that serves its model is too busy
	// (on_wait) or in outage (on_outage). None by default: such a request
	// is refused (503) as without them.
	Fallbacks []Fallback `yaml:"fallbacks,omitempty"`

	// UserPolicy holds the per-user defaults; Users overrides them for
	// named users.
	UserPolicy `yaml:",inline"`
	// Users overrides the per-user policy for named users (user_id → policy;
	// fields left out keep the tenant's values).
	Users map[string]UserPolicy `yaml:"users,omitempty"`
}

// Fallback is one fallback rule of a tenant: requests for a model of
// group From that its group cannot take, for a reason listed in When, are
// admitted into the first of To that can take them. A fallback is one hop:
// a job never falls back from the group it fell back to.
type Fallback struct {
	// From is the model group whose requests may fall back. Required; one
	// rule per group.
	From string `yaml:"from"`
	// To are the fallbacks, tried in order: each a model group's name (the
	// job then runs on the group's first exact model name) or a model name
	// that a group serves (the job runs on that model, in that group). At
	// least one; not From's group.
	To []string `yaml:"to"`
	// When lists the reasons to fall back: on_wait (the estimated wait in
	// From is longer than the tenant's max_wait), on_outage (From's outage
	// has outlasted upstream.max_outage), or only never (the rule is kept
	// but off). Required.
	When []string `yaml:"when"`
}

// The reasons to fall back (Fallback.When).
const (
	FallbackOnWait   = "on_wait"
	FallbackOnOutage = "on_outage"
	FallbackNever    = "never"
)

// On reports whether the rule falls back for reason (FallbackOnWait or
// FallbackOnOutage).
func (f Fallback) On(reason string) bool { return slices.Contains(f.When, reason) }

// FallbackFor is the tenant's fallback rule for model group g.
func (t *Tenant) FallbackFor(g string) (Fallback, bool) {
	for _, f := range t.Fallbacks {
		if f.From == g {
			return f, true
		}
	}
	return Fallback{}, false
}

// UserPolicy is what each user of a tenant may use.
type UserPolicy struct {
	// Weight is the user's fair-queue weight: a user of weight 2 is served
	// twice the tokens of a user of weight 1 when both wait. Default 1.
	Weight float64 `yaml:"weight,omitempty"`
	// RequestsPerHour is the user's request quota, a token bucket refilling
	// continuously (20 an hour: one every 3 minutes). 0 means unlimited.
	// Default 0.
	RequestsPerHour int `yaml:"requests_per_hour,omitempty"`
	// TokensPerHour is the user's token quota (input estimate + max_tokens
	// reserved at admission, settled to the real usage), a bucket like
	// RequestsPerHour. 0 means unlimited. Default 0.
	TokensPerHour int `yaml:"tokens_per_hour,omitempty"`
	// MaxQueued is how many of the user's jobs may wait at once (429
	// queue_limit beyond). 0 means unlimited. Default 50.
	MaxQueued int `yaml:"max_queued,omitempty"`
	// BudgetUSDPerDay and BudgetUSDPerMonth cap what the user may spend,
	// in US dollars per UTC day and per UTC month, at usage.prices: each
	// job reserves its worst case at admission and settles to its real
	// cost. 0 means no cap. Default 0.
	BudgetUSDPerDay   float64 `yaml:"budget_usd_per_day,omitempty"`
	BudgetUSDPerMonth float64 `yaml:"budget_usd_per_month,omitempty"`
	// Classes are the service classes the user's jobs may ask for
	// (ClassInteractive, ClassBackground); empty means both. A user's
	// own list replaces the tenant's.
	Classes []string `yaml:"classes,omitempty"`
}

// The service classes of a job. Interactive jobs are dispatched before
// background jobs whenever both wait; background keeps a minimum share of
// the dispatches (ModelGroup.BackgroundMinShare).
const (
	ClassInteractive = "interactive"
	ClassBackground  = "background"
)

// AllowsClass reports whether p lets a job of class c run.
func (p UserPolicy) AllowsClass(c string) bool {
	return len(p.Classes) == 0 || slices.Contains(p.Classes, c)
}

// AllowedClasses are the classes p allows, in the order of the list.
func (p UserPolicy) AllowedClasses() []string {
	if len(p.Classes) == 0 {
		return []string{ClassInteractive, ClassBackground}
	}
	return p.Classes
}

// Policy is the effective policy of one of the tenant's users: the tenant's
// values with the user's overrides.
func (t *Tenant) Policy(user string) UserPolicy {
	p := t.UserPolicy
	if o, ok := t.Users[user]; ok {
		if o.Weight > 0 {
			p.Weight = o.Weight
		}
		if o.RequestsPerHour != 0 {
			p.RequestsPerHour = o.RequestsPerHour
		}
		if o.TokensPerHour != 0 {
			p.TokensPerHour = o.TokensPerHour
		}
		if o.MaxQueued != 0 {
			p.MaxQueued = o.MaxQueued
		}
		if o.BudgetUSDPerDay != 0 {
			p.BudgetUSDPerDay = o.BudgetUSDPerDay
		}
		if o.BudgetUSDPerMonth != 0 {
			p.BudgetUSDPerMonth = o.BudgetUSDPerMonth
		}
		if len(o.Classes) > 0 {
			p.Classes = o.Classes
		}
	}
	return p
}

// ModelGroup is a set of models that share upstream rate limits, with its own
// fair queue.
type ModelGroup struct {
	// Name is unique, [a-z0-9][a-z0-9_-]*, at most 64 characters. Required.
	Name string `yaml:"name"`
	// Models are exact model names or path.Match patterns ("claude-sonnet-*").
	// At least one; a name may appear in one group only.
	Models []string `yaml:"models"`
	// RPM is the group's limit in requests per minute. Required, > 0.
	RPM int `yaml:"rpm"`
	// InputTPM is the group's limit in input tokens per minute. Required, > 0.
	InputTPM int `yaml:"input_tpm"`
	// OutputTPM is the group's limit in output tokens per minute. Required, > 0.
	OutputTPM int `yaml:"output_tpm"`
	// MaxConcurrency caps simultaneous upstream calls across the fleet.
	// Default 8; if set, > 0.
	MaxConcurrency int `yaml:"max_concurrency"`
	// CountCacheReads makes cache reads count against InputTPM, as they do for
	// legacy models. Default false.
	CountCacheReads bool `yaml:"count_cache_reads"`
	// Burst is how many requests sluice may send at once, as a duration of
	// the RPM limit: 3s of 60 RPM is 3 requests (at least 1). Small keeps the
	// group paced (the upstream may enforce 60 RPM as 1 request per second);
	// the long-run rate is the limit either way. (Token buckets hold 95% of
	// their per-minute limit: max_tokens reservations must fit.) Default 3s.
	Burst time.Duration `yaml:"burst"`
	// CountTokens makes admission ask the upstream's count_tokens endpoint
	// for the exact input tokens instead of estimating them locally (one
	// more upstream call per job, with its own rate limit; on failure the
	// local estimate is used). Default false.
	CountTokens bool `yaml:"count_tokens"`
	// OutageFailures is how many upstream calls in a row must fail for
	// reasons of the upstream's own (refused or broken connections, no
	// answer, 500/502/503/504/529), with no call answered in between and
	// each within OutageWindow of the last, before the group goes into
	// outage: dispatching stops fleet-wide and one probe call at a time
	// tests the upstream. Default 5.
	OutageFailures int `yaml:"outage_failures"`
	// OutageWindow: a failure more than this after the previous one starts
	// the count again. Default 30s.
	OutageWindow time.Duration `yaml:"outage_window"`
	// ProbeInterval is the wait before the first probe of an outage; it
	// doubles after each failed probe (with jitter) up to
	// ProbeIntervalMax. Defaults 1s and 30s.
	ProbeInterval    time.Duration `yaml:"probe_interval"`
	ProbeIntervalMax time.Duration `yaml:"probe_interval_max"`
	// OutputAccounting is how the upstream counts output tokens against
	// OutputTPM: "produced" (the current rule: as they are produced;
	// max_tokens plays no part) or "reserved" (the older rule: max_tokens
	// at the start, corrected at the end). With "produced" a dispatch holds
	// the output the call is expected to produce (learned from the group's
	// answers), not max_tokens, and max_tokens may exceed OutputTPM.
	// Default "produced".
	OutputAccounting string `yaml:"output_accounting"`
	// CacheHold bounds how long a queued job waits for another job's call
	// to write a prompt-cache prefix the two share (cache-aware dispatch):
	// when several waiting jobs share a cacheable prefix the upstream has
	// not cached yet, one goes first and the others keep their place until
	// its answer begins (the prefix is then cached and they read it) or
	// this long after it was sent. 0 turns the hold off. Default 10s.
	CacheHold time.Duration `yaml:"cache_hold"`
	// BackgroundMinShare is the least share of the group's dispatches made
	// while background jobs waited (counted in requests over the current
	// and the previous minute) that background jobs get while interactive
	// jobs also wait; interactive jobs otherwise go first. 0 gives interactive jobs strict priority.
	// Default 0.10.
	BackgroundMinShare float64 `yaml:"background_min_share"`
	// Batch lets the group send background jobs that can wait through the
	// Message Batches API, at its discount and outside the Messages API's
	// per-minute limits: a background job of the job API whose
	// deadline_seconds is at least BatchSlack waits up to BatchWindow
	// (or until BatchMaxJobs such jobs wait) and goes upstream in one
	// batch with the others. Default false.
	Batch bool `yaml:"batch"`
	// BatchSlack is the least deadline_seconds a job needs to go by batch
	// (most batches end within an hour, none later than 24 h). Default 1h.
	BatchSlack time.Duration `yaml:"batch_slack"`
	// BatchWindow is how long a batch collects jobs: a batch goes when its
	// first job has waited this long. Default 30s.
	BatchWindow time.Duration `yaml:"batch_window"`
	// BatchMaxJobs: a batch goes at once when this many jobs wait.
	// Default 1000 (the API takes up to 100,000).
	BatchMaxJobs int `yaml:"batch_max_jobs"`
	// BatchFallbackAfter: a job still not in a batch this long after its
	// admission (the Batches API refused or failed every try) joins the
	// group's Messages line as an ordinary background job. Less than
	// BatchSlack. Default 10m.
	BatchFallbackAfter time.Duration `yaml:"batch_fallback_after"`
	// BatchPoll is the wait before a batch's first status check; each
	// check that finds it still processing doubles the wait, up to 5m.
	// Default 30s.
	BatchPoll time.Duration `yaml:"batch_poll"`
}

// Batch defaults (ModelGroup's Batch fields, when zero).
const (
	DefaultBatchSlack         = time.Hour
	DefaultBatchWindow        = 30 * time.Second
	DefaultBatchMaxJobs       = 1000
	DefaultBatchFallbackAfter = 10 * time.Minute
	DefaultBatchPoll          = 30 * time.Second
	// BatchPollMax caps the wait between two checks of a batch.
	BatchPollMax = 5 * time.Minute
)

// BatchSettings are a group's batch fields with the defaults for those
// left zero.
func (g *ModelGroup) BatchSettings() (slack, window time.Duration, maxJobs int, fallbackAfter, poll time.Duration) {
	d := func(v, def time.Duration) time.Duration {
		if v > 0 {
			return v
		}
		return def
	}
	maxJobs = g.BatchMaxJobs
	if maxJobs <= 0 {
		maxJobs = DefaultBatchMaxJobs
	}
	return d(g.BatchSlack, DefaultBatchSlack), d(g.BatchWindow, DefaultBatchWindow), maxJobs,
		d(g.BatchFallbackAfter, DefaultBatchFallbackAfter), d(g.BatchPoll, DefaultBatchPoll)
}

// The upstream's rules for counting output tokens (ModelGroup.OutputAccounting).
const (
	OutputProduced = "produced"
	OutputReserved = "reserved"
)

// DefaultModel is the model a job that falls back to g by the group's
// name runs on: the first of its models that is an exact name, not a
// pattern ("" when it lists only patterns).
func (g *ModelGroup) DefaultModel() string {
	for _, m := range g.Models {
		if !isPattern(m) && strings.TrimSpace(m) != "" {
			return m
		}
	}
	return ""
}

// Produced reports whether g's upstream counts output as it is produced.
func (g *ModelGroup) Produced() bool { return g.OutputAccounting != OutputReserved }

// API configures the HTTP server.
type API struct {
	// BodyLimitBytes is the largest request body accepted, in bytes; larger
	// is a 413. Default 8 MiB (8388608).
	BodyLimitBytes int64 `yaml:"body_limit_bytes"`
	// ShutdownTimeout is how long a stopping api waits for open requests and
	// streams. Default 10s.
	ShutdownTimeout time.Duration `yaml:"shutdown_timeout"`
	// ReadHeaderTimeout bounds reading a request's headers. Default 10s.
	ReadHeaderTimeout time.Duration `yaml:"read_header_timeout"`
	// BodyTimeout bounds reading a request's body, from the end of its
	// headers; a client slower than that gets its connection closed. It
	// does not limit how long a response (an event stream) lasts. Default 30s.
	BodyTimeout time.Duration `yaml:"body_timeout"`
	// IdleTimeout closes a kept-alive connection with no request for this
	// long. Default 2m.
	IdleTimeout time.Duration `yaml:"idle_timeout"`
	// FollowerLease is how long an api process's count of a job's event
	// stream followers outlives the process: a killed api's followers stop
	// counting after it, so cancel_on_disconnect works again. Processes
	// renew their counts every third of it. Default 30s.
	FollowerLease time.Duration `yaml:"follower_lease"`
}

// Worker configures the upstream workers.
type Worker struct {
	// ShutdownTimeout is how long a stopping worker lets running calls finish
	// before handing them back to the queue. Default 25s.
	ShutdownTimeout time.Duration `yaml:"shutdown_timeout"`
	// TaskCheckInterval is how often an idle worker polls for tasks (asynq's
	// own default of 1s would add up to a second of latency). Default 2ms (an idle worker then polls Redis about 500 times a second per model group).
	TaskCheckInterval time.Duration `yaml:"task_check_interval"`
	// LeaseTTL is how long a running call's concurrency slot stays taken
	// without a heartbeat (workers renew every third of it): when a worker
	// dies mid-call, its slot returns and its job is queued again within
	// this time plus a third of it (the grace a live worker gets to renew
	// once Redis answers again after an outage). Default 15s.
	LeaseTTL time.Duration `yaml:"lease_ttl"`
}

// Log configures logging.
type Log struct {
	// Format is "text" or "json". Default "text"; env SLUICE_LOG_FORMAT.
	Format string `yaml:"format"`
	// Level is debug, info, warn or error. Default "info"; env SLUICE_LOG_LEVEL.
	Level string `yaml:"level"`
}

// Default returns a Config with every default filled in and no tenants,
// model groups or admin keys.
func Default() *Config {
	return &Config{
		Listen:       DefaultListen,
		WorkerListen: DefaultWorkerListen,
		RedisURL:     DefaultRedisURL,
		Upstream: Upstream{
			BaseURL:          DefaultUpstreamBaseURL,
			AttemptTimeout:   DefaultAttemptTimeout,
			MaxAttempts:      DefaultMaxAttempts,
			BackoffBase:      DefaultBackoffBase,
			BackoffMax:       DefaultBackoffMax,
			MaxOutage:        DefaultMaxOutage,
			FirstByteTimeout: DefaultFirstByteTimeout,
		},
		Redis: Redis{
			Mode:          DefaultRedisMode,
			Timeout:       DefaultRedisTimeout,
			CheckInterval: DefaultRedisCheck,
			WaitTimeout:   DefaultRedisWaitTimeout,
		},
		API: API{
			BodyLimitBytes:    DefaultBodyLimitBytes,
			ShutdownTimeout:   DefaultAPIShutdown,
			ReadHeaderTimeout: DefaultReadHeaderTimeout,
			BodyTimeout:       DefaultBodyTimeout,
			IdleTimeout:       DefaultIdleTimeout,
			FollowerLease:     DefaultFollowerLease,
		},
		Worker: Worker{
			ShutdownTimeout:   DefaultWorkerShutdown,
			TaskCheckInterval: DefaultTaskCheckInterval,
			LeaseTTL:          DefaultLeaseTTL,
		},
		Log: Log{
			Format: DefaultLogFormat,
			Level:  DefaultLogLevel,
		},
		Usage: Usage{
			HourlyRetention: DefaultHourlyRetention,
			DailyRetention:  DefaultDailyRetention,
			ShippedPrices:   true,
		},
	}
}

// Load reads the YAML file at path, applies defaults and environment
// overrides, and validates the result. A path of "" means no file: defaults
// and environment only. getenv is usually os.Getenv; nil means an empty
// environment. Every problem found is returned, joined with errors.Join.
func Load(path string, getenv func(string) string) (*Config, error) {
	var data []byte
	if path != "" {
		var err error
		data, err = os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("read config: %w", err)
		}
	}
	return Parse(data, getenv)
}

// Parse is Load from the bytes of a YAML document.
func Parse(data []byte, getenv func(string) string) (*Config, error) {
	if getenv == nil {
		getenv = func(string) string { return "" }
	}

	// The document as a tree first: syntax errors stop here (with their
	// line), and the tree gives the paths for the decoder's messages.
	var root yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	switch err := dec.Decode(&root); {
	case errors.Is(err, io.EOF): // empty file: defaults only
	case err != nil:
		return nil, err
	default:
		var next yaml.Node
		if err := dec.Decode(&next); !errors.Is(err, io.EOF) {
			if err != nil {
				return nil, err
			}
			return nil, fmt.Errorf("line %d: the file must hold one YAML document, found another", next.Line)
		}
	}

	// Decoding over the defaults leaves them in place for every field the
	// file omits or leaves empty (yaml.v3 does not zero a struct, string or
	// number for a null value).
	c := Default()
	var decodeErrs []*fieldError
	if root.Kind != 0 {
		strict := yaml.NewDecoder(bytes.NewReader(data))
		strict.KnownFields(true)
		var msgs []string
		var te *yaml.TypeError
		switch err := strict.Decode(c); {
		case errors.As(err, &te):
			msgs = te.Errors
		case err != nil:
			return nil, err
		}
		decodeErrs = decodeProblems(&root, msgs)
		applyElementDefaults(c, &root)
	}

	envErrs, fromEnv := applyEnv(c, getenv)
	c.Redis.Mode = strings.ToLower(strings.TrimSpace(c.Redis.Mode))
	c.Log.Format = strings.ToLower(strings.TrimSpace(c.Log.Format))
	c.Log.Level = strings.ToLower(strings.TrimSpace(c.Log.Level))

	// A field the decoder could not read holds a default or a zero value;
	// validating it too would only repeat the same problem less clearly.
	var errs []error
	for _, e := range decodeErrs {
		errs = append(errs, e)
	}
	for _, e := range envErrs {
		errs = append(errs, e)
	}
	for _, p := range c.problems() {
		if coveredBy(p.Path, decodeErrs) {
			continue
		}
		if env, ok := fromEnv[p.Path]; ok {
			p.Msg += " (set by " + env + ")"
		}
		errs = append(errs, p)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	c.normalizeUsers()
	return c, nil
}

// applyElementDefaults fills the defaults of list elements' fields. Decoding
// over Default() handles the top-level sections, but yaml.v3 builds each list
// element from its zero value. A second, lenient decode of just those fields
// into yaml.Node tells an omitted (or empty) field from one set to 0, merge
// keys included.
// Both decodes drop the same malformed elements, so the indexes agree.
func applyElementDefaults(c *Config, root *yaml.Node) {
	var given struct {
		Tenants []struct {
			DefaultMaxTokens yaml.Node `yaml:"default_max_tokens"`
			Weight           yaml.Node `yaml:"weight"`
			MaxMessages      yaml.Node `yaml:"max_messages"`
			MaxQueued        yaml.Node `yaml:"max_queued"`
			MaxWait          yaml.Node `yaml:"max_wait"`
			MaxTokensPolicy  yaml.Node `yaml:"max_tokens_policy"`
		} `yaml:"tenants"`
		ModelGroups []struct {
			MaxConcurrency   yaml.Node `yaml:"max_concurrency"`
			Burst            yaml.Node `yaml:"burst"`
			OutageFailures   yaml.Node `yaml:"outage_failures"`
			OutageWindow     yaml.Node `yaml:"outage_window"`
			ProbeInterval    yaml.Node `yaml:"probe_interval"`
			ProbeIntervalMax yaml.Node `yaml:"probe_interval_max"`
			OutputAccounting yaml.Node `yaml:"output_accounting"`
			CacheHold        yaml.Node `yaml:"cache_hold"`
			BackgroundShare  yaml.Node `yaml:"background_min_share"`
		} `yaml:"model_groups"`
	}
	// Errors were already collected by the strict decode.
	_ = root.Decode(&given)
	omitted := func(n yaml.Node) bool { return n.Kind == 0 || n.ShortTag() == "!!null" }
	for i := range c.Tenants {
		if i >= len(given.Tenants) || omitted(given.Tenants[i].DefaultMaxTokens) {
			c.Tenants[i].DefaultMaxTokens = DefaultMaxTokens
		}
		if i >= len(given.Tenants) || omitted(given.Tenants[i].Weight) {
			c.Tenants[i].Weight = DefaultWeight
		}
		if i >= len(given.Tenants) || omitted(given.Tenants[i].MaxMessages) {
			c.Tenants[i].MaxMessages = DefaultMaxMessages
		}
		if i >= len(given.Tenants) || omitted(given.Tenants[i].MaxQueued) {
			c.Tenants[i].MaxQueued = DefaultMaxQueued
		}
		if i >= len(given.Tenants) || omitted(given.Tenants[i].MaxWait) {
			c.Tenants[i].MaxWait = DefaultMaxWait
		}
		if i >= len(given.Tenants) || omitted(given.Tenants[i].MaxTokensPolicy) {
			c.Tenants[i].MaxTokensPolicy = DefaultMaxTokensPolicy
		}
	}
	for i := range c.ModelGroups {
		if i >= len(given.ModelGroups) || omitted(given.ModelGroups[i].MaxConcurrency) {
			c.ModelGroups[i].MaxConcurrency = DefaultMaxConcurrency
		}
		if i >= len(given.ModelGroups) || omitted(given.ModelGroups[i].Burst) {
			c.ModelGroups[i].Burst = DefaultBurst
		}
		if i >= len(given.ModelGroups) || omitted(given.ModelGroups[i].OutageFailures) {
			c.ModelGroups[i].OutageFailures = DefaultOutageFailures
		}
		if i >= len(given.ModelGroups) || omitted(given.ModelGroups[i].OutageWindow) {
			c.ModelGroups[i].OutageWindow = DefaultOutageWindow
		}
		if i >= len(given.ModelGroups) || omitted(given.ModelGroups[i].ProbeInterval) {
			c.ModelGroups[i].ProbeInterval = DefaultProbeInterval
		}
		if i >= len(given.ModelGroups) || omitted(given.ModelGroups[i].ProbeIntervalMax) {
			c.ModelGroups[i].ProbeIntervalMax = DefaultProbeIntervalMax
		}
		if i >= len(given.ModelGroups) || omitted(given.ModelGroups[i].CacheHold) {
			c.ModelGroups[i].CacheHold = DefaultCacheHold
		}
		if i >= len(given.ModelGroups) || omitted(given.ModelGroups[i].BackgroundShare) {
			c.ModelGroups[i].BackgroundMinShare = DefaultBackgroundShare
		}
		if i >= len(given.ModelGroups) || omitted(given.ModelGroups[i].OutputAccounting) {
			c.ModelGroups[i].OutputAccounting = DefaultOutputAccounting
		}
	}
}

// applyEnv applies the environment overrides to c. It returns the problems
// with SLUICE_ADMIN_KEY, and the config paths it set with the variable that
// set them, so that validation can say where a bad value came from.
func applyEnv(c *Config, getenv func(string) string) ([]*fieldError, map[string]string) {
	fromEnv := map[string]string{}
	set := func(dst *string, path, env string) {
		if v := strings.TrimSpace(getenv(env)); v != "" {
			*dst = v
			fromEnv[path] = env
		}
	}
	set(&c.Listen, "listen", envListen)
	set(&c.WorkerListen, "worker_listen", envWorkerListen)
	set(&c.RedisURL, "redis_url", envRedisURL)
	set(&c.Redis.Mode, "redis.mode", envRedisMode)
	set(&c.Upstream.BaseURL, "upstream.base_url", envBaseURL)
	set(&c.Upstream.APIKey, "upstream.api_key", envAPIKey)
	set(&c.Upstream.AdminKey, "upstream.admin_key", envAdminAPIKey)
	set(&c.Log.Format, "log.format", envLogFormat)
	set(&c.Log.Level, "log.level", envLogLevel)
	var errs []*fieldError
	switch v := strings.ToLower(strings.TrimSpace(getenv(envAllowEvict))); v {
	case "":
	case "1", "true", "yes":
		c.Redis.AllowEvicting = true
		fromEnv["redis.allow_evicting"] = envAllowEvict
	case "0", "false", "no":
		c.Redis.AllowEvicting = false
		fromEnv["redis.allow_evicting"] = envAllowEvict
	default:
		errs = append(errs, &fieldError{Path: envAllowEvict, Msg: fmt.Sprintf("must be true or false, not %q", v)})
	}

	v := strings.TrimSpace(getenv(envAdminKey))
	if v == "" {
		return errs, fromEnv
	}
	k, err := ParseKey(v)
	if err != nil {
		return append(errs, &fieldError{Path: envAdminKey, Msg: err.Error()}), fromEnv
	}
	// The same key in the file and the environment is one admin key, not a
	// duplicate; the same key as a tenant's would give that tenant admin
	// rights, so it is refused.
	for _, a := range c.AdminKeys {
		if a.valid && a.digest == k.digest {
			return errs, fromEnv
		}
	}
	for i, t := range c.Tenants {
		for j, tk := range t.Keys {
			if tk.valid && tk.digest == k.digest {
				return append(errs, &fieldError{Path: envAdminKey, Msg: fmt.Sprintf("same key as tenants[%d].keys[%d]; an admin key must not also be a tenant's key", i, j)}), fromEnv
			}
		}
	}
	c.AdminKeys = append(c.AdminKeys, k)
	return errs, fromEnv
}

// GroupFor returns the model group that serves model: a group that lists the
// name exactly wins; otherwise the first group, in order, with a pattern that
// GroupNames are the model groups' names, in configuration order: what
// readers that span groups (job listings, usage reports) read.
func (c *Config) GroupNames() []string {
	out := make([]string, len(c.ModelGroups))
	for i, g := range c.ModelGroups {
		out[i] = g.Name
	}
	return out
}

// matches it.
func (c *Config) GroupFor(model string) (*ModelGroup, bool) {
	for i := range c.ModelGroups {
		for _, m := range c.ModelGroups[i].Models {
			if !isPattern(m) && m == model {
				return &c.ModelGroups[i], true
			}
		}
	}
	for i := range c.ModelGroups {
		for _, m := range c.ModelGroups[i].Models {
			if isPattern(m) {
				if ok, _ := path.Match(m, model); ok {
					return &c.ModelGroups[i], true
				}
			}
		}
	}
	return nil, false
}

// Why FallbackTarget cannot resolve a name.
var (
	// ErrUnknownFallback: the name is neither a model group's nor a model
	// that a group serves.
	ErrUnknownFallback = errors.New("neither a model group nor a model served here")
	// ErrPatternsOnly: the name is a group whose models are all patterns,
	// so it says no model to run.
	ErrPatternsOnly = errors.New("a model group that lists only patterns, so it names no model to run")
)

// FallbackTarget resolves a fallback given as name: a model group's name
// (the group wins over a model of the same name), which runs the group's
// DefaultModel, or a model name, which runs in the group that serves it.
func (c *Config) FallbackTarget(name string) (*ModelGroup, string, error) {
	for i := range c.ModelGroups {
		if g := &c.ModelGroups[i]; g.Name == name {
			m := g.DefaultModel()
			if m == "" {
				return g, "", ErrPatternsOnly
			}
			return g, m, nil
		}
	}
	if g, ok := c.GroupFor(name); ok {
		return g, name, nil
	}
	return nil, "", ErrUnknownFallback
}

// TenantForKey returns the tenant that owns the presented API key. Every key
// of every tenant is compared in constant time, with no early exit, so the
// time taken does not tell which tenant (if any) matched.
func (c *Config) TenantForKey(presented string) (*Tenant, bool) {
	d := digestOf(presented)
	var found *Tenant
	for i := range c.Tenants {
		for _, k := range c.Tenants[i].Keys {
			if k.matchesDigest(d) && found == nil {
				found = &c.Tenants[i]
			}
		}
	}
	return found, found != nil
}

// Tenant is the tenant named name.
func (c *Config) Tenant(name string) (*Tenant, bool) {
	for i := range c.Tenants {
		if c.Tenants[i].Name == name {
			return &c.Tenants[i], true
		}
	}
	return nil, false
}

// IsAdminKey reports whether presented is one of the admin keys, comparing
// with every one in constant time.
func (c *Config) IsAdminKey(presented string) bool {
	d := digestOf(presented)
	ok := false
	for _, k := range c.AdminKeys {
		if k.matchesDigest(d) {
			ok = true
		}
	}
	return ok
}
