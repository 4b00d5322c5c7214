package config

import (
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.yaml.in/yaml/v3"
)

// env returns a getenv over the given name, value pairs.
func env(kv ...string) func(string) string {
	m := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return func(k string) string { return m[k] }
}

func mustKey(tb testing.TB, s string) Key {
	tb.Helper()
	k, err := ParseKey(s)
	if err != nil {
		tb.Fatalf("ParseKey: %v", err)
	}
	return k
}

func mustParse(tb testing.TB, doc string, getenv func(string) string) *Config {
	tb.Helper()
	c, err := Parse([]byte(doc), getenv)
	if err != nil {
		tb.Fatalf("Parse: unexpected error:\n%v", err)
	}
	return c
}

// messages lists the problems joined in err, sorted.
func messages(tb testing.TB, err error) []string {
	tb.Helper()
	if err == nil {
		tb.Fatal("want an error, got none")
	}
	var out []string
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		for _, e := range j.Unwrap() {
			out = append(out, e.Error())
		}
	} else {
		out = []string{err.Error()}
	}
	slices.Sort(out)
	return out
}

// minimal is the smallest valid file: one tenant, one group, the rest defaults.
const minimal = `
tenants:
  - name: acme
    keys: ["acme-key-0123456789"]
model_groups:
  - name: sonnet
    models: ["claude-sonnet-*"]
    rpm: 50
    input_tpm: 30000
    output_tpm: 8000
`

func TestParseGoodFile(t *testing.T) {
	const doc = `
listen: "127.0.0.1:9000"
worker_listen: ":9001"
redis_url: "redis://:pw@redis:6379/2"
upstream:
  base_url: "http://fake:8090"
  attempt_timeout: 2m
  max_attempts: 6
  backoff_base: 500ms
  backoff_max: 1m
admin_keys: ["admin-key-0123456789"]
tenants:
  - name: acme
    keys:
      - "acme-key-0123456789"
      - "sha256:` + "d52c8971988b9a512c81307c58a22395654bc25924ec6e5e667792a05d08acbf" + `"
    default_max_tokens: 2048
  - name: beta_2
    keys: ["beta-key-0123456789"]
model_groups:
  - name: sonnet
    models: [claude-sonnet-4-5, "claude-sonnet-*"]
    rpm: 50
    input_tpm: 30000
    output_tpm: 8000
    max_concurrency: 4
    count_cache_reads: true
  - name: haiku
    models: ["claude-haiku-*"]
    rpm: 100
    input_tpm: 50000
    output_tpm: 10000
redis: {timeout: 500ms, allow_evicting: true}
api: {body_limit_bytes: 1048576, shutdown_timeout: 5s, body_timeout: 1m}
worker: {shutdown_timeout: 20s, task_check_interval: 10ms}
log: {format: JSON, level: debug}
`
	got := mustParse(t, doc, env())
	want := &Config{
		Listen:       "127.0.0.1:9000",
		WorkerListen: ":9001",
		RedisURL:     "redis://:pw@redis:6379/2",
		Upstream: Upstream{
			BaseURL:        "http://fake:8090",
			AttemptTimeout: 2 * time.Minute,
			MaxAttempts:    6,
			BackoffBase:    500 * time.Millisecond,
			BackoffMax:     time.Minute,
			MaxOutage:      DefaultMaxOutage,

			FirstByteTimeout: DefaultFirstByteTimeout,
		},
		AdminKeys: []Key{mustKey(t, "admin-key-0123456789")},
		Tenants: []Tenant{
			{Name: "acme", Keys: []Key{mustKey(t, "acme-key-0123456789"), mustKey(t, "example-research-key-0002")}, DefaultMaxTokens: 2048, MaxTokensPolicy: "clamp", MaxMessages: 1000, MaxWait: 15 * time.Minute, UserPolicy: UserPolicy{Weight: 1, MaxQueued: 50}},
			{Name: "beta_2", Keys: []Key{mustKey(t, "beta-key-0123456789")}, DefaultMaxTokens: DefaultMaxTokens, MaxTokensPolicy: "clamp", MaxMessages: 1000, MaxWait: 15 * time.Minute, UserPolicy: UserPolicy{Weight: 1, MaxQueued: 50}},
		},
		ModelGroups: []ModelGroup{
			{Name: "sonnet", Models: []string{"claude-sonnet-4-5", "claude-sonnet-*"}, RPM: 50, InputTPM: 30000, OutputTPM: 8000, MaxConcurrency: 4, CountCacheReads: true, Burst: DefaultBurst, OutageFailures: DefaultOutageFailures, OutageWindow: DefaultOutageWindow, ProbeInterval: DefaultProbeInterval, ProbeIntervalMax: DefaultProbeIntervalMax, OutputAccounting: OutputProduced, CacheHold: DefaultCacheHold, BackgroundMinShare: DefaultBackgroundShare},
			{Name: "haiku", Models: []string{"claude-haiku-*"}, RPM: 100, InputTPM: 50000, OutputTPM: 10000, MaxConcurrency: DefaultMaxConcurrency, Burst: DefaultBurst, OutageFailures: DefaultOutageFailures, OutageWindow: DefaultOutageWindow, ProbeInterval: DefaultProbeInterval, ProbeIntervalMax: DefaultProbeIntervalMax, OutputAccounting: OutputProduced, CacheHold: DefaultCacheHold, BackgroundMinShare: DefaultBackgroundShare},
		},
		Redis: Redis{Mode: RedisSingle, Timeout: 500 * time.Millisecond, AllowEvicting: true, CheckInterval: DefaultRedisCheck, WaitTimeout: DefaultRedisWaitTimeout},
		API: API{BodyLimitBytes: 1 << 20, ShutdownTimeout: 5 * time.Second, ReadHeaderTimeout: DefaultReadHeaderTimeout,
			BodyTimeout: time.Minute, IdleTimeout: DefaultIdleTimeout, FollowerLease: DefaultFollowerLease},
		Worker: Worker{ShutdownTimeout: 20 * time.Second, TaskCheckInterval: 10 * time.Millisecond, LeaseTTL: DefaultLeaseTTL},
		Log:    Log{Format: "json", Level: "debug"},
		Usage:  Usage{HourlyRetention: DefaultHourlyRetention, DailyRetention: DefaultDailyRetention, ShippedPrices: true},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Parse mismatch (-want +got):\n%s", diff)
	}
}

func TestDefaultsFilled(t *testing.T) {
	got := mustParse(t, minimal, env())
	want := Default()
	want.Tenants = []Tenant{{Name: "acme", Keys: []Key{mustKey(t, "acme-key-0123456789")}, DefaultMaxTokens: 1024, MaxTokensPolicy: "clamp", MaxMessages: 1000, MaxWait: 15 * time.Minute, UserPolicy: UserPolicy{Weight: 1, MaxQueued: 50}}}
	want.ModelGroups = []ModelGroup{{Name: "sonnet", Models: []string{"claude-sonnet-*"}, RPM: 50, InputTPM: 30000, OutputTPM: 8000, MaxConcurrency: 8, Burst: DefaultBurst, OutageFailures: DefaultOutageFailures, OutageWindow: DefaultOutageWindow, ProbeInterval: DefaultProbeInterval, ProbeIntervalMax: DefaultProbeIntervalMax, OutputAccounting: OutputProduced, CacheHold: DefaultCacheHold, BackgroundMinShare: DefaultBackgroundShare}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("defaults (-want +got):\n%s", diff)
	}
	// The documented values, spelled out once.
	d := Default()
	for _, c := range []struct {
		name      string
		got, want any
	}{
		{"listen", d.Listen, ":8080"},
		{"worker_listen", d.WorkerListen, ":8081"},
		{"redis_url", d.RedisURL, "redis://127.0.0.1:6379/0"},
		{"base_url", d.Upstream.BaseURL, "https://api.anthropic.com"},
		{"attempt_timeout", d.Upstream.AttemptTimeout, 10 * time.Minute},
		{"max_attempts", d.Upstream.MaxAttempts, 4},
		{"backoff_base", d.Upstream.BackoffBase, time.Second},
		{"backoff_max", d.Upstream.BackoffMax, 30 * time.Second},
		{"body_limit_bytes", d.API.BodyLimitBytes, int64(8388608)},
		{"api.shutdown_timeout", d.API.ShutdownTimeout, 10 * time.Second},
		{"worker.shutdown_timeout", d.Worker.ShutdownTimeout, 25 * time.Second},
		{"task_check_interval", d.Worker.TaskCheckInterval, 2 * time.Millisecond},
		{"lease_ttl", d.Worker.LeaseTTL, 15 * time.Second},
		{"redis.timeout", d.Redis.Timeout, 2 * time.Second},
		{"redis.allow_evicting", d.Redis.AllowEvicting, false},
		{"redis.check_interval", d.Redis.CheckInterval, 30 * time.Second},
		{"api.read_header_timeout", d.API.ReadHeaderTimeout, 10 * time.Second},
		{"api.body_timeout", d.API.BodyTimeout, 30 * time.Second},
		{"api.idle_timeout", d.API.IdleTimeout, 2 * time.Minute},
		{"api.follower_lease", d.API.FollowerLease, 30 * time.Second},
		{"log.format", d.Log.Format, "text"},
		{"log.level", d.Log.Level, "info"},
		{"usage.hourly_retention", d.Usage.HourlyRetention, 168 * time.Hour},
		{"usage.daily_retention", d.Usage.DailyRetention, 9600 * time.Hour},
		{"metrics.require_admin_key", d.Metrics.RequireAdminKey, false},
	} {
		if c.got != c.want {
			t.Errorf("Default %s = %v, want %v", c.name, c.got, c.want)
		}
	}
}

// An omitted field, or one left empty, takes its default; one written out is
// used as written and validated.
func TestOmittedVersusExplicit(t *testing.T) {
	group := func(extra string) string {
		return `
tenants:
  - name: acme
    keys: ["acme-key-0123456789"]
model_groups:
  - name: sonnet
    models: ["claude-sonnet-*"]
    input_tpm: 30000
    output_tpm: 8000
` + extra
	}
	tests := []struct {
		name    string
		doc     string
		want    []string // problems; nil means valid
		wantCon int
	}{
		{name: "usage retention below its minimum", doc: group("    rpm: 5\n") + "usage: {hourly_retention: 30m, daily_retention: 12h}\n",
			want: []string{"usage.daily_retention: must be at least 24h, got 12h0m0s", "usage.hourly_retention: must be at least 1h, got 30m0s"}},
		{name: "rpm omitted is required", doc: group("    max_concurrency: 3\n"), want: []string{"model_groups[0].rpm: must be > 0"}},
		{name: "rpm 0 is an error", doc: group("    rpm: 0\n"), want: []string{"model_groups[0].rpm: must be > 0"}},
		{name: "max_concurrency omitted is 8", doc: group("    rpm: 5\n"), wantCon: 8},
		{name: "max_concurrency empty is 8", doc: group("    rpm: 5\n    max_concurrency:\n"), wantCon: 8},
		{name: "max_concurrency -1 is an error", doc: group("    rpm: 5\n    max_concurrency: -1\n"), want: []string{"model_groups[0].max_concurrency: must be > 0"}},
		{name: "max_concurrency 0 is an error", doc: group("    rpm: 5\n    max_concurrency: 0\n"), want: []string{"model_groups[0].max_concurrency: must be > 0"}},
		{name: "empty section keeps its defaults", doc: group("    rpm: 5\nupstream:\napi:\n"), wantCon: 8},
		{name: "explicit zero duration is an error", doc: group("    rpm: 5\nupstream:\n  attempt_timeout: 0s\n"), want: []string{"upstream.attempt_timeout: must be > 0"}},
		{name: "explicit empty string is an error", doc: group("    rpm: 5\nlisten: \"\"\n"), want: []string{`listen: want host:port such as ":8080" or "127.0.0.1:8080", got ""`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse([]byte(tt.doc), env())
			if tt.want != nil {
				if diff := cmp.Diff(tt.want, messages(t, err)); diff != "" {
					t.Errorf("problems (-want +got):\n%s", diff)
				}
				return
			}
			if err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			if got := c.ModelGroups[0].MaxConcurrency; got != tt.wantCon {
				t.Errorf("max_concurrency = %d, want %d", got, tt.wantCon)
			}
			if got := c.Upstream.AttemptTimeout; got != DefaultAttemptTimeout {
				t.Errorf("attempt_timeout = %v, want the default", got)
			}
		})
	}
}

func TestMergeKeyFillsGroupFields(t *testing.T) {
	// Anchors may live inside a list element; merged fields count as given.
	c := mustParse(t, `
tenants:
  - name: acme
    keys: ["acme-key-0123456789"]
model_groups:
  - &base
    name: sonnet
    models: ["claude-sonnet-*"]
    rpm: 5
    input_tpm: 10
    output_tpm: 10
    max_concurrency: 2
  - <<: *base
    name: haiku
    models: ["claude-haiku-*"]
`, env())
	if got := c.ModelGroups[1].MaxConcurrency; got != 2 {
		t.Errorf("merged max_concurrency = %d, want 2", got)
	}
	if got := c.ModelGroups[1].RPM; got != 5 {
		t.Errorf("merged rpm = %d, want 5", got)
	}
}

func TestTenantDefaultMaxTokens(t *testing.T) {
	c, err := Parse([]byte(`
tenants:
  - name: a
    keys: ["a-key-0123456789abc"]
  - name: b
    keys: ["b-key-0123456789abc"]
    default_max_tokens: 0
  - name: c
    keys: ["c-key-0123456789abc"]
    default_max_tokens: 300
model_groups:
  - {name: g, models: [m], rpm: 1, input_tpm: 1, output_tpm: 1}
`), env())
	if diff := cmp.Diff([]string{"tenants[1].default_max_tokens: must be > 0"}, messages(t, err)); diff != "" {
		t.Errorf("problems (-want +got):\n%s", diff)
	}
	if c != nil {
		t.Errorf("a config with problems must not be returned")
	}
	c = mustParse(t, `
tenants:
  - name: a
    keys: ["a-key-0123456789abc"]
  - name: c
    keys: ["c-key-0123456789abc"]
    default_max_tokens: 300
model_groups:
  - {name: g, models: [m], rpm: 1, input_tpm: 1, output_tpm: 1}
`, env())
	if got := []int{c.Tenants[0].DefaultMaxTokens, c.Tenants[1].DefaultMaxTokens}; !slices.Equal(got, []int{1024, 300}) {
		t.Errorf("default_max_tokens = %v, want [1024 300]", got)
	}
}

func TestEnvOverrides(t *testing.T) {
	const file = minimal + `
listen: ":9000"
worker_listen: ":9001"
redis_url: "redis://file:6379/1"
upstream: {base_url: "https://file.example"}
log: {format: text, level: info}
`
	tests := []struct {
		name  string
		env   []string
		check func(*Config) any
		want  any
	}{
		{"SLUICE_LISTEN", []string{"SLUICE_LISTEN", ":7000"}, func(c *Config) any { return c.Listen }, ":7000"},
		{"SLUICE_WORKER_LISTEN", []string{"SLUICE_WORKER_LISTEN", ":7001"}, func(c *Config) any { return c.WorkerListen }, ":7001"},
		{"REDIS_URL", []string{"REDIS_URL", "redis://env:6380/3"}, func(c *Config) any { return c.RedisURL }, "redis://env:6380/3"},
		{"ANTHROPIC_BASE_URL", []string{"ANTHROPIC_BASE_URL", "http://127.0.0.1:8090"}, func(c *Config) any { return c.Upstream.BaseURL }, "http://127.0.0.1:8090"},
		{"ANTHROPIC_API_KEY", []string{"ANTHROPIC_API_KEY", "sk-ant-secret"}, func(c *Config) any { return c.Upstream.APIKey }, "sk-ant-secret"},
		{"SLUICE_LOG_FORMAT", []string{"SLUICE_LOG_FORMAT", "json"}, func(c *Config) any { return c.Log.Format }, "json"},
		{"SLUICE_LOG_LEVEL", []string{"SLUICE_LOG_LEVEL", "WARN"}, func(c *Config) any { return c.Log.Level }, "warn"},
		{"SLUICE_ADMIN_KEY", []string{"SLUICE_ADMIN_KEY", "admin-from-env-0123"}, func(c *Config) any { return c.IsAdminKey("admin-from-env-0123") }, true},
		{"empty value is unset", []string{"SLUICE_LISTEN", ""}, func(c *Config) any { return c.Listen }, ":9000"},
		{"no env keeps the file", nil, func(c *Config) any { return c.RedisURL }, "redis://file:6379/1"},
		{"no env, no api key", nil, func(c *Config) any { return c.Upstream.APIKey }, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := mustParse(t, file, env(tt.env...))
			if got := tt.check(c); got != tt.want {
				t.Errorf("got %v, want %v", got, tt.want)
			}
		})
	}

	t.Run("env over defaults without a file", func(t *testing.T) {
		_, err := Load("", env("SLUICE_LISTEN", "bad"))
		want := []string{
			`listen: want host:port such as ":8080" or "127.0.0.1:8080", got "bad" (set by SLUICE_LISTEN)`,
			"model_groups: at least one model group is required",
			"tenants: at least one tenant is required",
		}
		if diff := cmp.Diff(want, messages(t, err)); diff != "" {
			t.Errorf("problems (-want +got):\n%s", diff)
		}
	})
}

func TestEnvAdminKey(t *testing.T) {
	file := minimal + "admin_keys: [\"admin-key-0123456789\"]\n"
	tests := []struct {
		name      string
		key       string
		wantErr   []string
		wantAdmin int
	}{
		{name: "adds one", key: "other-admin-0123456789", wantAdmin: 2},
		{name: "hashed", key: HashKey("other-admin-0123456789"), wantAdmin: 2},
		{name: "same as the file's is one key", key: "admin-key-0123456789", wantAdmin: 1},
		{name: "too short", key: "short", wantErr: []string{"SLUICE_ADMIN_KEY: a plain key must be at least 16 characters long, this one has 5 (make one with `openssl rand -hex 24`)"}},
		{name: "a tenant's key", key: "acme-key-0123456789", wantErr: []string{"SLUICE_ADMIN_KEY: same key as tenants[0].keys[0]; an admin key must not also be a tenant's key"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse([]byte(file), env("SLUICE_ADMIN_KEY", tt.key))
			if tt.wantErr != nil {
				if diff := cmp.Diff(tt.wantErr, messages(t, err)); diff != "" {
					t.Errorf("problems (-want +got):\n%s", diff)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(c.AdminKeys) != tt.wantAdmin {
				t.Errorf("%d admin keys, want %d", len(c.AdminKeys), tt.wantAdmin)
			}
			if !c.IsAdminKey("admin-key-0123456789") {
				t.Errorf("the file's admin key no longer works")
			}
		})
	}
}

func TestEveryProblemListed(t *testing.T) {
	const doc = `
listen: "8080"
redis_url: "http://cache:6379"
upstream:
  base_url: "api.anthropic.com"
  max_attempts: 0
  backoff_base: 10s
  backoff_max: 5s
admin_keys: ["short"]
tenants:
  - name: Acme
    keys:
      - "sha256:abcd"
      - "sha256:zz8c8971988b9a512c81307c58a22395654bc25924ec6e5e667792a05d08acbf"
  - name: acme2
    keys: []
    default_max_tokens: 0
  - name: acme2
    keys:
      - "acme-key-0123456789"
      - "sha256:` + "86ff01e8bcd94c28a4f4f8e4ec7ad5a0d4dfe0ac53848d6c5b2a0a4b8b5df6b0" + `"
      - "has a space in it!!"
  - name: "` + "x2345678901234567890123456789012345678901234567890123456789012345" + `"
    keys: ["acme-key-0123456789"]
model_groups:
  - name: ""
    models: []
    rpm: 0
    output_tpm: -5
    max_concurrency: -1
  - name: g1
    models: ["claude-[", "claude-x", ""]
    rpm: 1
    input_tpm: 1
    output_tpm: 1
    max_concurrency: 0
  - name: g2
    models: ["claude-x", "claude-*", "claude-*"]
    rpm: 1
    input_tpm: 1
    output_tpm: 1
api: {body_limit_bytes: 0}
worker: {task_check_interval: 0s}
log: {format: xml, level: verbose}
`
	_, err := Parse([]byte(strings.Replace(doc, "86ff01e8bcd94c28a4f4f8e4ec7ad5a0d4dfe0ac53848d6c5b2a0a4b8b5df6b0", HashKey("acme-key-0123456789")[len("sha256:"):], 1)), env())
	want := []string{
		`admin_keys[0]: a plain key must be at least 16 characters long, this one has 5 (make one with ` + "`openssl rand -hex 24`)",
		`api.body_limit_bytes: must be > 0`,
		`listen: want host:port such as ":8080" or "127.0.0.1:8080", got "8080"`,
		`log.format: must be "text" or "json", got "xml"`,
		`log.level: must be one of debug, info, warn, error, got "verbose"`,
		`model_groups[0].input_tpm: must be > 0`,
		`model_groups[0].max_concurrency: must be > 0`,
		`model_groups[0].models: at least one model name or pattern is required`,
		`model_groups[0].name: required`,
		`model_groups[0].output_tpm: must be > 0`,
		`model_groups[0].rpm: must be > 0`,
		`model_groups[1].max_concurrency: must be > 0`,
		`model_groups[1].models[0]: "claude-[" is not a valid pattern (see Go's path.Match: *, ?, [a-z], \ to escape)`,
		`model_groups[1].models[2]: must not be empty`,
		`model_groups[2].models[0]: "claude-x" is already listed at model_groups[1].models[1]`,
		`model_groups[2].models[2]: "claude-*" is already listed at model_groups[2].models[1]`,
		`redis_url: not a valid Redis URL (redis://host:port/db, rediss:// or unix://): redis: invalid URL scheme: http`,
		`tenants[0].keys[0]: a hashed key must be "sha256:" followed by 64 hex digits, got 4 characters after the prefix`,
		`tenants[0].keys[1]: a hashed key must be "sha256:" followed by 64 hex digits; this one has a character that is not a hex digit`,
		`tenants[0].name: must be lowercase letters, digits, '_' and '-', starting with a letter or digit; got "Acme"`,
		`tenants[1].default_max_tokens: must be > 0`,
		`tenants[1].keys: at least one key is required`,
		`tenants[2].keys[1]: same key as tenants[2].keys[0]; every key must be unique`,
		`tenants[2].keys[2]: a key may hold only printable ASCII characters without spaces, since clients send it in an HTTP header`,
		`tenants[2].name: "acme2" is already the name at tenants[1].name`,
		`tenants[3].keys[0]: same key as tenants[2].keys[0]; every key must be unique`,
		`tenants[3].name: must be at most 64 characters, got 65`,
		`upstream.backoff_max: must not be less than upstream.backoff_base (10s)`,
		`upstream.base_url: want an absolute http or https URL such as "https://api.anthropic.com", got "api.anthropic.com"`,
		`upstream.max_attempts: must be > 0`,
		`worker.task_check_interval: must be > 0`,
	}
	if diff := cmp.Diff(want, messages(t, err)); diff != "" {
		t.Errorf("problems (-want +got):\n%s", diff)
	}
}

func TestDecodeProblems(t *testing.T) {
	tests := []struct {
		name string
		doc  string
		want []string
	}{
		{
			name: "unknown fields, each named",
			doc: minimal + `
lisen: ":9000"
upstream:
  base_ur: "http://x"
`,
			want: []string{
				"lisen: unknown field; the fields here are listen, worker_listen, redis_url, redis, upstream, admin_keys, tenants, model_groups, api, worker, log, metrics, usage (line 12)",
				"upstream.base_ur: unknown field; the fields here are base_url, attempt_timeout, max_attempts, backoff_base, backoff_max, max_outage, first_byte_timeout (line 14)",
			},
		},
		{
			name: "unknown field in a list element",
			doc: `
tenants:
  - name: acme
    key: ["acme-key-0123456789"]
model_groups:
  - {name: g, models: [m], rpm: 1, input_tpm: 1, output_tpm: 1, max_concurency: 3}
`,
			want: []string{
				"model_groups[0].max_concurency: unknown field; the fields here are name, models, rpm, input_tpm, output_tpm, max_concurrency, count_cache_reads, burst, count_tokens, outage_failures, outage_window, probe_interval, probe_interval_max, output_accounting, cache_hold, background_min_share, batch, batch_slack, batch_window, batch_max_jobs, batch_fallback_after, batch_poll (line 6)",
				"tenants[0].key: unknown field; the fields here are name, keys, default_max_tokens, max_tokens_cap, max_tokens_policy, max_body_bytes, max_messages, max_input_tokens, max_wait, tenant_budget_usd_per_day, tenant_budget_usd_per_month, fallbacks, weight, requests_per_hour, tokens_per_hour, max_queued, budget_usd_per_day, budget_usd_per_month, classes, users (line 4)",
				"tenants[0].keys: at least one key is required",
			},
		},
		{
			name: "api_key in the file",
			doc: minimal + `
upstream:
  api_key: "sk-ant-secret"
`,
			want: []string{"upstream.api_key: the upstream API key is a secret and is read only from the environment variable ANTHROPIC_API_KEY; remove it from the file (line 13)"},
		},
		{
			name: "several type errors, all listed, with no echo from validation",
			doc: `
listen: [":8080"]
upstream:
  attempt_timeout: 600
  max_attempts: many
api: {shutdown_timeout: soon}
tenants:
  - name: acme
    keys: ["acme-key-0123456789"]
    default_max_tokens: lots
model_groups:
  - name: g
    models: m
    rpm: fifty
    input_tpm: 1
    output_tpm: 1
    count_cache_reads: maybe
`,
			want: []string{
				`api.shutdown_timeout: want a duration such as "30s" or "10m", got "soon" (line 6)`,
				`listen: want a string, got a list (line 2)`,
				`model_groups[0].count_cache_reads: want true or false, got "maybe" (line 17)`,
				`model_groups[0].models: want a list, got "m" (line 13)`,
				`model_groups[0].rpm: want a whole number, got "fifty" (line 14)`,
				`tenants[0].default_max_tokens: want a whole number, got "lots" (line 10)`,
				`upstream.attempt_timeout: want a duration such as "30s" or "10m", got 600 (line 4)`,
				`upstream.max_attempts: want a whole number, got "many" (line 5)`,
			},
		},
		{
			name: "a list element of the wrong kind hides the list's other problems",
			doc: `
tenants:
  - just-a-name
  - name: b
    keys: []
model_groups:
  - {name: g, models: [m], rpm: 1, input_tpm: 1, output_tpm: 1}
`,
			want: []string{`tenants[0]: want a mapping of fields, got "just-a-..." (line 3)`},
		},
		{
			name: "empty list item",
			doc: `
tenants:
  - name: acme
    keys:
      -
      - "acme-key-0123456789"
model_groups:
  - {name: g, models: [m], rpm: 1, input_tpm: 1, output_tpm: 1}
`,
			want: []string{"tenants[0].keys[0]: empty list item (line 5)"},
		},
		{
			name: "key given twice",
			doc: `
tenants:
  - name: acme
    keys: ["acme-key-0123456789"]
    name: acme2
model_groups:
  - {name: g, models: [m], rpm: 1, input_tpm: 1, output_tpm: 1}
`,
			want: []string{"tenants[0].name: given twice (lines 3 and 5)"},
		},
		{
			name: "a key that is not a string",
			doc: `
tenants:
  - name: acme
    keys: [{plain: "acme-key-0123456789"}]
model_groups:
  - {name: g, models: [m], rpm: 1, input_tpm: 1, output_tpm: 1}
`,
			want: []string{"tenants[0].keys[0]: a key must be a string"},
		},
		{
			name: "not a mapping at all",
			doc:  "hello\n",
			want: []string{`top level: want a mapping of fields, got "hello" (line 1)`},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.doc), env())
			if diff := cmp.Diff(tt.want, messages(t, err)); diff != "" {
				t.Errorf("problems (-want +got):\n%s", diff)
			}
		})
	}
}

func TestSyntaxErrors(t *testing.T) {
	tests := []struct {
		name string
		doc  string
		want string
	}{
		{"bad indentation", "tenants:\n  - name: a\n keys: [x]\n", "yaml: line 2: did not find expected key"},
		{"unclosed flow", "listen: [\":8080\"\n", "line 1"},
		{"two documents", "listen: \":1\"\n---\nlisten: \":2\"\n", "line 2: the file must hold one YAML document"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.doc), env())
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("got %v, want an error mentioning %q", err, tt.want)
			}
		})
	}
}

func TestValidateDefault(t *testing.T) {
	want := []string{
		"model_groups: at least one model group is required",
		"tenants: at least one tenant is required",
	}
	if diff := cmp.Diff(want, messages(t, Default().Validate())); diff != "" {
		t.Errorf("problems (-want +got):\n%s", diff)
	}
	c := Default()
	c.Tenants = []Tenant{{Name: "a", Keys: []Key{mustKey(t, "a-key-0123456789abc")}, DefaultMaxTokens: 1, MaxTokensPolicy: "clamp", MaxMessages: 1000, MaxWait: 15 * time.Minute, UserPolicy: UserPolicy{Weight: 1, MaxQueued: 50}}}
	c.ModelGroups = []ModelGroup{{Name: "g", Models: []string{"m"}, RPM: 1, InputTPM: 1, OutputTPM: 1, MaxConcurrency: 1, Burst: DefaultBurst, OutageFailures: DefaultOutageFailures, OutageWindow: DefaultOutageWindow, ProbeInterval: DefaultProbeInterval, ProbeIntervalMax: DefaultProbeIntervalMax, OutputAccounting: OutputProduced, CacheHold: DefaultCacheHold, BackgroundMinShare: DefaultBackgroundShare}}
	if err := c.Validate(); err != nil {
		t.Errorf("Validate: %v", err)
	}
	c.Tenants[0].Keys = append(c.Tenants[0].Keys, Key{})
	if diff := cmp.Diff([]string{"tenants[0].keys[1]: empty key"}, messages(t, c.Validate())); diff != "" {
		t.Errorf("problems (-want +got):\n%s", diff)
	}
}

func TestGroupFor(t *testing.T) {
	c := Default()
	c.ModelGroups = []ModelGroup{
		{Name: "sonnet", Models: []string{"claude-sonnet-*"}},
		{Name: "special", Models: []string{"claude-sonnet-4-5", "claude-?-test"}},
		{Name: "wide", Models: []string{"claude-*"}},
	}
	tests := []struct {
		model string
		want  string // "" = no group
	}{
		{"claude-sonnet-4-5", "special"}, // exact beats an earlier pattern
		{"claude-sonnet-4-6", "sonnet"},  // first matching pattern, in order
		{"claude-x-test", "special"},
		{"claude-haiku-4-5", "wide"},
		{"claude-sonnet", "wide"},
		{"gpt-4", ""},
		{"", ""},
	}
	for _, tt := range tests {
		g, ok := c.GroupFor(tt.model)
		got := ""
		if ok {
			got = g.Name
		}
		if got != tt.want {
			t.Errorf("GroupFor(%q) = %q, want %q", tt.model, got, tt.want)
		}
	}
	g, _ := c.GroupFor("claude-sonnet-4-6")
	if g != &c.ModelGroups[0] {
		t.Errorf("GroupFor must point into the config, not at a copy")
	}
}

func TestTenantForKeyAndAdmin(t *testing.T) {
	c := mustParse(t, `
admin_keys: ["admin-key-0123456789"]
tenants:
  - name: a
    keys: ["a-key-0123456789abc", "`+HashKey("a-rotated-key-0123456")+`"]
  - name: b
    keys: ["b-key-0123456789abc"]
model_groups:
  - {name: g, models: [m], rpm: 1, input_tpm: 1, output_tpm: 1}
`, env())
	tests := []struct {
		key   string
		want  string
		admin bool
	}{
		{"a-key-0123456789abc", "a", false},
		{"a-rotated-key-0123456", "a", false},
		{"b-key-0123456789abc", "b", false},
		{"admin-key-0123456789", "", true},
		{HashKey("a-key-0123456789abc"), "", false}, // the hash is not the key
		{"", "", false},
		{"nobody-0123456789abc", "", false},
	}
	for _, tt := range tests {
		tn, ok := c.TenantForKey(tt.key)
		got := ""
		if ok {
			got = tn.Name
		}
		if got != tt.want {
			t.Errorf("TenantForKey(%q) = %q, want %q", tt.key, got, tt.want)
		}
		if got := c.IsAdminKey(tt.key); got != tt.admin {
			t.Errorf("IsAdminKey(%q) = %v, want %v", tt.key, got, tt.admin)
		}
	}
	if Default().IsAdminKey("") {
		t.Errorf("no admin keys must mean no admin")
	}
}

func TestDumpAndPrintingHideSecrets(t *testing.T) {
	const (
		tenantKey = "tenant-plain-key-0123456789"
		adminKey  = "admin-plain-key-0123456789"
		apiKey    = "sk-ant-api03-very-secret"
		redisPass = "redis-pass-secret"
	)
	c := mustParse(t, `
redis_url: "redis://user:`+redisPass+`@cache:6379/0"
admin_keys: ["`+adminKey+`"]
tenants:
  - name: acme
    keys: ["`+tenantKey+`"]
model_groups:
  - {name: sonnet, models: ["claude-sonnet-*"], rpm: 50, input_tpm: 30000, output_tpm: 8000}
`, env("ANTHROPIC_API_KEY", apiKey))

	var b strings.Builder
	c.Dump(&b)
	dump := b.String()
	yml, err := yaml.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	outputs := map[string]string{
		"Dump":  dump,
		"%v":    fmt.Sprintf("%v", c),
		"%+v":   fmt.Sprintf("%+v", *c),
		"yaml":  string(yml),
		"error": fmt.Sprint(Parse([]byte(`admin_keys: ["short"]`), env())),
	}
	for name, out := range outputs {
		for _, secret := range []string{tenantKey, adminKey, apiKey, redisPass, "short\""} {
			if secret == redisPass && name != "Dump" {
				continue // only Dump hides URL passwords; the others print RedisURL as given
			}
			if strings.Contains(out, secret) {
				t.Errorf("%s shows the secret %q:\n%s", name, secret, out)
			}
		}
	}
	for _, want := range []string{
		"upstream.api_key             set",
		"redis://user:xxxxx@cache:6379/0",
		"admin_keys                   " + HashKey(adminKey)[:15] + "…",
		"tenants[0]                   acme: keys " + HashKey(tenantKey)[:15] + "…; default_max_tokens 1024",
		"model_groups[0]              sonnet: claude-sonnet-*; rpm 50, input_tpm 30000, output_tpm 8000, max_concurrency 8, count_cache_reads false, cache_hold 10s; output counted produced; outage after 5 failures within 30s, probes every 1s to 30s",
	} {
		if !strings.Contains(dump, want) {
			t.Errorf("Dump lacks %q:\n%s", want, dump)
		}
	}
	if strings.Contains(dump, HashKey(tenantKey)) {
		t.Errorf("Dump shows whole digests, want their start only:\n%s", dump)
	}

	c.Upstream.APIKey = ""
	b.Reset()
	c.Dump(&b)
	if !strings.Contains(b.String(), "upstream.api_key             not set") {
		t.Errorf("Dump must say the api key is not set:\n%s", b.String())
	}
}

// A config written back out (keys hashed, no API key) reads back the same.
func TestMarshalRoundTrip(t *testing.T) {
	c := mustParse(t, minimal+"admin_keys: [\"admin-key-0123456789\"]\n", env())
	out, err := yaml.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	back := mustParse(t, string(out), env())
	if diff := cmp.Diff(c, back); diff != "" {
		t.Errorf("round trip (-want +got):\n%s", diff)
	}
}

func TestLoad(t *testing.T) {
	if _, err := Load("testdata/does-not-exist.yaml", env()); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing file: got %v, want a not-exist error", err)
	}
}

func TestExampleFileLoads(t *testing.T) {
	c, err := Load("../sluice.example.yaml", env())
	if err != nil {
		t.Fatalf("sluice.example.yaml does not load:\n%v", err)
	}
	if tn, ok := c.TenantForKey("example-classroom-key-0001"); !ok || tn.Name != "classroom" {
		t.Errorf("the example's plain tenant key does not work")
	}
	if tn, ok := c.TenantForKey("example-research-key-0002"); !ok || tn.Name != "research" {
		t.Errorf("the example's hashed tenant key does not match the key its comment names")
	}
	if !c.IsAdminKey("example-admin-key-0003") {
		t.Errorf("the example's admin key does not match the key its comment names")
	}
	for model, group := range map[string]string{"claude-sonnet-4-5": "sonnet", "claude-haiku-4-5": "haiku"} {
		if g, ok := c.GroupFor(model); !ok || g.Name != group {
			t.Errorf("GroupFor(%q) in the example: want %q", model, group)
		}
	}
	// The example shows the defaults: it must agree with them.
	want := Default()
	want.AdminKeys, want.Tenants, want.ModelGroups = c.AdminKeys, c.Tenants, c.ModelGroups
	if diff := cmp.Diff(want, c); diff != "" {
		t.Errorf("the example's values differ from the defaults (-default +example):\n%s", diff)
	}
}

// Configured prices win over the shipped list; left-out cache and batch
// prices follow the input price; nonsense is refused with the field named.
func TestPrices(t *testing.T) {
	c := mustParse(t, minimal+`usage:
  prices:
    - models: ["claude-sonnet-*"]
      input: 2
      output: 8
      cache_read: 0.1
`, env())
	p, ok := c.PriceTable().Lookup("claude-sonnet-4-6")
	if !ok || p.Input != 2 || p.Output != 8 || p.CacheRead != 0.1 || p.CacheWrite5m != 2.5 || p.CacheWrite1h != 4 || p.BatchDiscount != 0.5 {
		t.Errorf("configured price: %+v %v", p, ok)
	}
	if p, ok := c.PriceTable().Lookup("claude-haiku-4-5"); !ok || p.Input != 1 {
		t.Errorf("shipped price under a configured list: %+v %v", p, ok)
	}
	off := mustParse(t, minimal+"usage:\n  shipped_prices: false\n", env())
	if _, ok := off.PriceTable().Lookup("claude-haiku-4-5"); ok {
		t.Error("shipped_prices: false still prices haiku")
	}
	_, err := Parse([]byte(minimal+`usage:
  prices:
    - models: []
      input: -1
      output: 3
      batch_discount: 2
`), env())
	for _, want := range []string{
		"usage.prices[0].models: at least one model name or pattern is required",
		"usage.prices[0].input: must be a price of 0 or more dollars per million tokens, got -1",
		"usage.prices[0].batch_discount: must be between 0 and 1 (0.5 = half price), got 2",
	} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q: %v", want, err)
		}
	}
}

// Budgets are dollars ≥ 0, per tenant and per user; a user's override
// wins over the tenant's default.
func TestBudgets(t *testing.T) {
	c := mustParse(t, strings.Replace(minimal, "    keys:", "    tenant_budget_usd_per_day: 20\n    budget_usd_per_day: 1.5\n    users:\n      vip: {budget_usd_per_day: 5}\n    keys:", 1), env())
	tn := &c.Tenants[0]
	if tn.TenantBudgetUSDPerDay != 20 || tn.Policy("ann").BudgetUSDPerDay != 1.5 || tn.Policy("vip").BudgetUSDPerDay != 5 {
		t.Errorf("budgets: tenant %v, ann %v, vip %v", tn.TenantBudgetUSDPerDay, tn.Policy("ann").BudgetUSDPerDay, tn.Policy("vip").BudgetUSDPerDay)
	}
	_, err := Parse([]byte(strings.Replace(minimal, "    keys:", "    tenant_budget_usd_per_month: -1\n    keys:", 1)), env())
	if err == nil || !strings.Contains(err.Error(), "tenants[0].tenant_budget_usd_per_month: must be an amount of US dollars ≥ 0") {
		t.Errorf("negative budget: %v", err)
	}
}

func TestClasses(t *testing.T) {
	c := mustParse(t, strings.Replace(minimal, "    keys:", "    classes: [interactive]\n    users:\n      batch: {classes: [background]}\n    keys:", 1), env())
	tn := &c.Tenants[0]
	if p := tn.Policy("ann"); !p.AllowsClass(ClassInteractive) || p.AllowsClass(ClassBackground) {
		t.Errorf("tenant's classes: %v", p.Classes)
	}
	if p := tn.Policy("batch"); p.AllowsClass(ClassInteractive) || !p.AllowsClass(ClassBackground) {
		t.Errorf("the user's own classes: %v", p.Classes)
	}
	if got := c.ModelGroups[0].BackgroundMinShare; got != DefaultBackgroundShare {
		t.Errorf("background_min_share default: %v", got)
	}
	if p := (UserPolicy{}); !p.AllowsClass(ClassBackground) || len(p.AllowedClasses()) != 2 {
		t.Errorf("no list allows both: %v", p.AllowedClasses())
	}
	zero := mustParse(t, minimal+"    background_min_share: 0\n", env())
	if got := zero.ModelGroups[0].BackgroundMinShare; got != 0 {
		t.Errorf("background_min_share 0: %v", got)
	}
	_, err := Parse([]byte(strings.Replace(minimal, "    keys:", "    classes: [urgent]\n    keys:", 1)+"    background_min_share: 1.5\n"), env())
	for _, want := range []string{`tenants[0].classes[0]: must be "interactive" or "background", not "urgent"`, "model_groups[0].background_min_share: must be a share from 0"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("want %q in %v", want, err)
		}
	}
}

// TestBatchSettings: a group's batch fields default when left out, and
// settings that could not work are refused with the field and the fix.
func TestBatchSettings(t *testing.T) {
	c := mustParse(t, minimal+"    batch: true\n", env())
	slack, window, maxJobs, after, poll := c.ModelGroups[0].BatchSettings()
	if !c.ModelGroups[0].Batch || slack != DefaultBatchSlack || window != DefaultBatchWindow || maxJobs != DefaultBatchMaxJobs ||
		after != DefaultBatchFallbackAfter || poll != DefaultBatchPoll {
		t.Errorf("defaults: %v %v %v %v %v", slack, window, maxJobs, after, poll)
	}
	for _, tc := range []struct{ extra, want string }{
		{"    batch: true\n    batch_fallback_after: 2h\n", "model_groups[0].batch_fallback_after: must be longer than batch_window (30s) and shorter than batch_slack (1h0m0s)"},
		{"    batch: true\n    batch_window: 20m\n", "model_groups[0].batch_fallback_after: must be longer than batch_window (20m0s)"},
		{"    batch_max_jobs: 200000\n", "model_groups[0].batch_max_jobs: must be from 1 to 100000"},
		{"    batch_poll: -1s\n", "model_groups[0].batch_poll: must be a positive duration"},
	} {
		_, err := Parse([]byte(minimal+tc.extra), env())
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v, want %q", tc.extra, err, tc.want)
		}
	}
}
