// Package harness runs a whole sluice in-process for tests: a private
// redis-server, the fake upstream over real HTTP, the api behind an
// httptest server and a worker, all wired as cmd/sluice wires them.
package harness

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/api"
	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/estimate"
	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/redistest"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/metrics"
	"github.com/sluice-dev/sluice/redisconn"
	"github.com/sluice-dev/sluice/scheduler"
	"github.com/sluice-dev/sluice/upstream"
	"github.com/sluice-dev/sluice/usage"
	"github.com/sluice-dev/sluice/web"
	"github.com/sluice-dev/sluice/worker"
)

// Keys the harness configures.
const (
	TenantKey      = "sk-test-tenant-a-0123456789"
	OtherTenantKey = "sk-test-tenant-b-0123456789"
	AdminKey       = "sk-test-admin-0123456789abc"
	UpstreamKey    = "sk-ant-test-upstream-key-000"
	Model          = "claude-sonnet-4-6"
)

// Options tune Start.
type Options struct {
	Fake        fakeanthropic.Config // Groups default to roomy limits; APIKeys to UpstreamKey
	ExtraConfig string               // YAML appended to the harness config
	NoWorker    bool
	Quiet       bool   // log at info, not debug (benchmarks)
	GroupExtra  string // YAML lines added to the model group (indented 4 spaces)
	TenantExtra string // YAML lines added to tenant "acme" (indented 4 spaces)
	// Groups are more model groups after the harness's "sonnet", as YAML
	// list items (each starting "  - name: …").
	Groups string
	// Clock, when set, is the clock of the api and of every scheduler
	// script (instead of Redis TIME).
	Clock func() time.Time
	// PositionEvery is the api's periodic position read (0 = its default).
	PositionEvery time.Duration
	// PingEvery is how often a streamed /v1/messages request gets a ping
	// (0 = the api's default).
	PingEvery time.Duration
	// MaxConcurrency is the model group's max_concurrency (0 = 8).
	MaxConcurrency int
	// UpstreamExtra: YAML lines added to the upstream section (indented 2
	// spaces), e.g. "  max_outage: 5s\n".
	UpstreamExtra string
	// APIExtra: YAML lines added to the api section (indented 2 spaces),
	// e.g. "  body_timeout: 1s\n".
	APIExtra string
	// RedisArgs are extra redis-server arguments (redistest.StartArgs).
	RedisArgs []string
	// RealUpstream presents the fake as a real upstream (the api's
	// Deps.FakeUpstream is false).
	RealUpstream bool
}

// Env is a running sluice.
type Env struct {
	Redis *redistest.Server
	RDB   *redis.Client
	Fake  *fakeanthropic.Server
	// Upstream serves Fake on a fixed address; a test may take it down
	// and bring it back.
	Upstream *Upstream
	Config   *config.Config
	Store    *jobs.Store
	Sched    *scheduler.Scheduler
	API      *httptest.Server
	Server   *api.Server
	Worker   *worker.Worker
	// Metrics are shared by the api and every worker started here, as in
	// `sluice serve`; Usage is the statistics recorder.
	Metrics *metrics.Metrics
	Usage   *usage.Recorder
	logs    *SyncBuffer
	level   slog.Level
}

// BaseConfig is the harness's configuration, for a given upstream URL.
func BaseConfig(redisURL, upstreamURL string) string {
	return groupConfig(redisURL, upstreamURL, "", "", "", 8)
}

func groupConfig(redisURL, upstreamURL, upstreamExtra, tenantExtra, groupExtra string, maxConcurrency int, apiExtra ...string) string {
	extra := ""
	if len(apiExtra) > 0 {
		extra = apiExtra[0]
	}
	return fmt.Sprintf(`redis_url: %q
upstream:
  base_url: %q
  max_attempts: 3
  backoff_base: 20ms
  backoff_max: 100ms
  attempt_timeout: 30s
%sadmin_keys: [%q]
tenants:
  - name: acme
    keys: [%q]
%s  - name: other
    keys: [%q]
model_groups:
  - name: sonnet
    models: ["claude-sonnet-*"]
    rpm: 6000
    input_tpm: 10000000
    output_tpm: 10000000
    max_concurrency: %d
%s
api:
  body_limit_bytes: 65536
  shutdown_timeout: 5s
%sworker:
  shutdown_timeout: 5s
`, redisURL, upstreamURL, upstreamExtra, AdminKey, TenantKey, tenantExtra, OtherTenantKey, maxConcurrency, groupExtra, extra)
}

// Start runs sluice for the test and stops it when the test ends.
func Start(tb testing.TB, o Options) *Env {
	tb.Helper()
	e := &Env{logs: &SyncBuffer{}, level: slog.LevelDebug}
	if o.Quiet {
		e.level = slog.LevelInfo
	}
	e.Redis = redistest.StartArgs(tb, o.RedisArgs...)
	// The pool the processes get (redisconn.New), not go-redis's default.
	e.RDB = redis.NewClient(&redis.Options{Addr: e.Redis.Addr, PoolSize: redisconn.DefaultPoolSize()})
	tb.Cleanup(func() { _ = e.RDB.Close() })

	fc := o.Fake
	if fc.Groups == nil {
		fc.Groups = []fakeanthropic.Group{{Name: "sonnet", Models: []string{"claude-sonnet-*"}, RPM: 100000, InputTPM: 100000000, OutputTPM: 100000000}}
	}
	if fc.APIKeys == nil {
		fc.APIKeys = []string{UpstreamKey}
	}
	fake, err := fakeanthropic.New(fc)
	if err != nil {
		tb.Fatal(err)
	}
	e.Fake = fake
	e.Upstream = StartUpstream(tb, fake)
	if o.MaxConcurrency == 0 {
		o.MaxConcurrency = 8
	}

	getenv := func(k string) string {
		if k == "ANTHROPIC_API_KEY" {
			return UpstreamKey
		}
		return ""
	}
	cfg, err := config.Parse([]byte(groupConfig(e.Redis.URL, e.Upstream.URL, o.UpstreamExtra, o.TenantExtra, o.GroupExtra+o.Groups, o.MaxConcurrency, o.APIExtra)+o.ExtraConfig), getenv)
	if err != nil {
		tb.Fatalf("harness config: %v", err)
	}
	e.Config = cfg
	log := slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: e.level}))
	e.Store = jobs.NewStore(e.RDB, jobs.Options{})
	e.Sched = scheduler.New(e.RDB, e.Store, scheduler.Options{LeaseTTL: cfg.Worker.LeaseTTL, MaxOutage: cfg.Upstream.MaxOutage, Clock: o.Clock,
		Wait: redisconn.NewWaiter(cfg.Redis.WaitReplicas, cfg.Redis.WaitTimeout, log)})
	e.Metrics = metrics.New()
	e.Metrics.Register(metrics.NewState(e.Sched, cfg.ModelGroups, log))
	e.Usage = usage.New(e.RDB, usage.Retention{Hourly: cfg.Usage.HourlyRetention, Daily: cfg.Usage.DailyRetention}, o.Clock).WithPrices(cfg.PriceTable())

	if !o.NoWorker {
		e.Worker = StartWorker(tb, e)
	}
	hub := jobs.NewHub(e.Store, log)
	apiUp := upstream.New(upstream.Options{BaseURL: cfg.Upstream.BaseURL, APIKey: cfg.Upstream.APIKey, FirstByteTimeout: cfg.Upstream.FirstByteTimeout})
	tb.Cleanup(apiUp.Close)
	secret, err := jobs.TokenSecret(context.Background(), e.RDB)
	if err != nil {
		tb.Fatal(err)
	}
	e.Server = api.New(api.Deps{FakeUpstream: !o.RealUpstream, Config: cfg, Redis: e.RDB, Store: e.Store, Hub: hub,
		Scheduler: e.Sched, Estimator: estimate.NewCalibrator(e.RDB), Upstream: apiUp, TokenSecret: secret, Web: web.Handler(), Logger: log, Clock: o.Clock, PositionEvery: o.PositionEvery, PingEvery: o.PingEvery,
		Dashboard: web.Dashboard(), Metrics: e.Metrics, Usage: e.Usage})
	e.API = httptest.NewServer(e.Server)
	tb.Cleanup(func() {
		e.Server.CloseStreams()
		e.API.Close()
		_ = hub.Close()
	})
	return e
}

// Do sends a request to the api with the tenant key (key "" = none).
func (e *Env) Do(tb testing.TB, method, path, key string, body any) (*http.Response, []byte) {
	tb.Helper()
	var r io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		r = strings.NewReader(b)
	case []byte:
		r = bytes.NewReader(b)
	default:
		j, err := json.Marshal(b)
		if err != nil {
			tb.Fatal(err)
		}
		r = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, e.API.URL+path, r)
	if err != nil {
		tb.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if key != "" {
		req.Header.Set("x-api-key", key)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	if err != nil {
		tb.Fatal(err)
	}
	return resp, out
}

// JobBody is a POST /v1/jobs body for user with one message.
func JobBody(user, text string) map[string]any {
	return map[string]any{
		"user_id": user,
		"request": map[string]any{"model": Model, "max_tokens": 100, "messages": []any{map[string]any{"role": "user", "content": text}}},
	}
}

// Submit creates a job and returns its view (with token).
func (e *Env) Submit(tb testing.TB, body any) jobs.View {
	tb.Helper()
	resp, b := e.Do(tb, http.MethodPost, "/v1/jobs", TenantKey, body)
	if resp.StatusCode != http.StatusAccepted {
		tb.Fatalf("submit: %d %s", resp.StatusCode, b)
	}
	var v jobs.View
	if err := json.Unmarshal(b, &v); err != nil {
		tb.Fatal(err)
	}
	return v
}

// Get reads a job through the api.
func (e *Env) Get(tb testing.TB, id string) jobs.View {
	tb.Helper()
	resp, b := e.Do(tb, http.MethodGet, "/v1/jobs/"+id, TenantKey, nil)
	if resp.StatusCode != http.StatusOK {
		tb.Fatalf("get %s: %d %s", id, resp.StatusCode, b)
	}
	var v jobs.View
	if err := json.Unmarshal(b, &v); err != nil {
		tb.Fatal(err)
	}
	return v
}

// WaitTerminal polls the job until it is terminal, failing the test after
// the deadline.
func (e *Env) WaitTerminal(tb testing.TB, id string, within time.Duration) jobs.View {
	tb.Helper()
	var v jobs.View
	Eventually(tb, within, func() bool {
		v = e.Get(tb, id)
		return v.Status.Terminal()
	}, "job %s to finish", id)
	return v
}

// Eventually polls cond until it holds or the deadline passes.
func Eventually(tb testing.TB, within time.Duration, cond func() bool, what string, args ...any) {
	tb.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out after %s waiting for "+what, append([]any{within}, args...)...)
		}
		time.Sleep(5 * time.Millisecond) // polling a condition with a deadline
	}
}

// Events reads a job's SSE stream until its terminal event (or the
// deadline) and returns the events.
func (e *Env) Events(tb testing.TB, ctx context.Context, id, key, lastEventID string) []SSEEvent {
	tb.Helper()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, e.API.URL+"/v1/jobs/"+id+"/events", nil)
	if key != "" {
		req.Header.Set("x-api-key", key)
	}
	if lastEventID != "" {
		req.Header.Set("Last-Event-ID", lastEventID)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		tb.Fatalf("events: %d %s", resp.StatusCode, b)
	}
	return ReadSSE(tb, resp.Body, -1)
}

// Logs is everything the api and worker logged so far (for secret checks).
func (e *Env) Logs() string {
	return e.logs.String()
}

// StartWorker starts one more worker on e's Redis, config and upstream (a
// second worker process, or the first when Options.NoWorker was set).
func StartWorker(tb testing.TB, e *Env) *worker.Worker {
	tb.Helper()
	log := slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: e.level}))
	up := upstream.New(upstream.Options{BaseURL: e.Config.Upstream.BaseURL, APIKey: e.Config.Upstream.APIKey, FirstByteTimeout: e.Config.Upstream.FirstByteTimeout})
	w := worker.New(worker.Deps{Config: e.Config, Redis: e.RDB, Store: e.Store, Scheduler: e.Sched,
		Estimator: estimate.NewCalibrator(e.RDB), Upstream: up, Metrics: e.Metrics, Usage: e.Usage, Logger: log})
	if err := w.Start(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { w.Shutdown(); up.Close() })
	return w
}

// StartAPI starts one more api "process" on e's Redis and config: its own
// Redis client, event hub and HTTP server.
func StartAPI(tb testing.TB, e *Env) *httptest.Server {
	tb.Helper()
	rdb := e.Redis.Client(tb)
	store := jobs.NewStore(rdb, jobs.Options{})
	sched := scheduler.New(rdb, store, scheduler.Options{LeaseTTL: e.Config.Worker.LeaseTTL, MaxOutage: e.Config.Upstream.MaxOutage})
	log := slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: e.level}))
	hub := jobs.NewHub(store, log)
	secret, err := jobs.TokenSecret(context.Background(), rdb)
	if err != nil {
		tb.Fatal(err)
	}
	srv := api.New(api.Deps{Config: e.Config, Redis: rdb, Store: store, Hub: hub, Scheduler: sched,
		Estimator: estimate.NewCalibrator(rdb), TokenSecret: secret, Web: web.Handler(), Logger: log,
		Dashboard: web.Dashboard(), Usage: usage.New(rdb, usage.Retention{Hourly: e.Config.Usage.HourlyRetention, Daily: e.Config.Usage.DailyRetention}, nil).WithPrices(e.Config.PriceTable())})
	ts := httptest.NewServer(srv)
	tb.Cleanup(func() { srv.CloseStreams(); ts.Close(); _ = hub.Close() })
	return ts
}

// Metric is one series' value in a Prometheus text page, e.g.
// Metric(page, `sluice_queue_jobs{group="sonnet"}`); ok is false when the
// page has no such series.
func Metric(page, series string) (v float64, ok bool) {
	for _, line := range strings.Split(page, "\n") {
		if rest, found := strings.CutPrefix(line, series+" "); found {
			v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			return v, err == nil
		}
	}
	return 0, false
}
