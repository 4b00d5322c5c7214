package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/proctest"
	"github.com/sluice-dev/sluice/internal/redistest"
	"github.com/sluice-dev/sluice/jobs"
)

// These tests run sluice as separate OS processes (one api, several
// workers) against one Redis and the fake upstream: the engine's decisions
// must hold across processes, and a worker must be killable.

// proc is a sluice process (internal/proctest runs it); cmd is its
// *exec.Cmd, for the tests that need its pid.
type proc struct {
	*proctest.Proc
	cmd *exec.Cmd
}

// startProc runs `sluice role --config cfg --listen 127.0.0.1:0`.
func startProc(t testing.TB, role, cfgPath string, env []string) *proc {
	t.Helper()
	p := proctest.Start(t, proctest.SluiceBinary(t), []string{role, "--config", cfgPath, "--listen", "127.0.0.1:0"},
		proctest.Options{Name: role, Env: env})
	return &proc{Proc: p, cmd: p.Cmd}
}

func (p *proc) baseURL(t testing.TB) string { t.Helper(); return p.BaseURL(t) }

type cluster struct {
	redis   *redistest.Server
	fake    *fakeanthropic.Server
	cfg     string
	env     []string
	api     string
	apiProc *proc
}

// startCluster starts the fake with the given limits, writes a config with
// the same limits, and starts one api process.
func startCluster(t testing.TB, g fakeanthropic.Group, maxConc int, fc fakeanthropic.Config, extra string) *cluster {
	t.Helper()
	return startClusterTenant(t, g, maxConc, fc, "", extra)
}

// startClusterTenant is startCluster with tenantExtra added to the tenant's
// block (lines indented by four spaces).
func startClusterTenant(t testing.TB, g fakeanthropic.Group, maxConc int, fc fakeanthropic.Config, tenantExtra, extra string) *cluster {
	t.Helper()
	return startClusterGroup(t, g, maxConc, fc, tenantExtra, "", extra)
}

// startClusterGroup is startClusterTenant with groupExtra added to the
// model group's block (lines indented by four spaces).
func startClusterGroup(t testing.TB, g fakeanthropic.Group, maxConc int, fc fakeanthropic.Config, tenantExtra, groupExtra, extra string) *cluster {
	t.Helper()
	r := redistest.Start(t)
	fc.Groups = []fakeanthropic.Group{g}
	fc.APIKeys = []string{harness.UpstreamKey}
	fake, err := fakeanthropic.New(fc)
	if err != nil {
		t.Fatal(err)
	}
	fsrv := httptest.NewServer(fake)
	t.Cleanup(fsrv.Close)
	cfg := fmt.Sprintf(`admin_keys: [%q]
tenants:
  - name: acme
    keys: [%q]
%smodel_groups:
  - name: %s
    models: ["claude-sonnet-*"]
    rpm: %d
    input_tpm: %d
    output_tpm: %d
    max_concurrency: %d
%supstream:
  backoff_base: 50ms
  backoff_max: 200ms
worker:
  shutdown_timeout: 5s
%s`, harness.AdminKey, harness.TenantKey, tenantExtra, g.Name, g.RPM, g.InputTPM, g.OutputTPM, maxConc, groupExtra, extra)
	path := filepath.Join(t.TempDir(), "sluice.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	c := &cluster{redis: r, fake: fake, cfg: path,
		env: []string{"REDIS_URL=" + r.URL, "ANTHROPIC_BASE_URL=" + fsrv.URL, "ANTHROPIC_API_KEY=" + harness.UpstreamKey, "SLUICE_LOG_LEVEL=debug"}}
	c.apiProc = c.start(t, "api")
	c.api = c.apiProc.baseURL(t)
	return c
}

func (c *cluster) start(t testing.TB, role string) *proc { return startProc(t, role, c.cfg, c.env) }

func (c *cluster) submit(t testing.TB, user, text string, maxTokens int) jobs.View {
	t.Helper()
	v, err := c.trySubmit(user, text, maxTokens)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// trySubmit is submit for other goroutines than the test's.
func (c *cluster) trySubmit(user, text string, maxTokens int) (jobs.View, error) {
	body := fmt.Sprintf(`{"user_id":%q,"request":{"model":"claude-sonnet-4-6","max_tokens":%d,"messages":[{"role":"user","content":%q}]}}`, user, maxTokens, text)
	req, _ := http.NewRequest(http.MethodPost, c.api+"/v1/jobs", strings.NewReader(body))
	req.Header.Set("x-api-key", harness.TenantKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return jobs.View{}, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var v jobs.View
	if resp.StatusCode != http.StatusAccepted {
		return v, fmt.Errorf("submit: %d %s", resp.StatusCode, b)
	}
	return v, json.Unmarshal(b, &v)
}

func (c *cluster) get(t testing.TB, id string) jobs.View {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, c.api+"/v1/jobs/"+id, nil)
	req.Header.Set("x-api-key", harness.TenantKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var v jobs.View
	_ = json.NewDecoder(resp.Body).Decode(&v)
	return v
}

func (c *cluster) waitAll(t testing.TB, ids []string, within time.Duration) map[string]jobs.View {
	t.Helper()
	done := map[string]jobs.View{}
	harness.Eventually(t, within, func() bool {
		for _, id := range ids {
			if _, ok := done[id]; ok {
				continue
			}
			if v := c.get(t, id); v.Status.Terminal() {
				done[id] = v
			}
		}
		return len(done) == len(ids)
	}, "%d jobs to finish", len(ids))
	return done
}

func TestMultiProcessRespectsLimits(t *testing.T) {
	const rpm, maxConc = 240, 3
	c := startCluster(t, fakeanthropic.Group{Name: "sonnet", Models: []string{"claude-sonnet-*"}, RPM: rpm, InputTPM: 100000, OutputTPM: 100000},
		maxConc, fakeanthropic.Config{TokensPerSecond: 100, ReplyTokens: 10}, "")
	workers := []*proc{c.start(t, "worker"), c.start(t, "worker")}
	var ids []string
	for i := range 40 {
		ids = append(ids, c.submit(t, fmt.Sprintf("user-%d", i%7), "hello there", 50).ID)
	}
	done := c.waitAll(t, ids, 60*time.Second)
	for id, v := range done {
		if v.Status != jobs.Succeeded {
			t.Fatalf("job %s: %s %+v", id, v.Status, v.Error)
		}
	}
	st := c.fake.Stats()
	if st.RateLimited != 0 {
		t.Fatalf("the fake sent %d 429s", st.RateLimited)
	}
	// Each worker process serves its own counters on its health port; the
	// fleet's sum is every call, and the api's page the shared state.
	var calls, admitted float64
	for _, w := range workers {
		calls += scrapeMetric(t, w.baseURL(t), `sluice_upstream_responses_total{group="sonnet",status="200"}`)
	}
	admitted = scrapeMetric(t, c.api, `sluice_admissions_total{group="sonnet",outcome="admitted"}`)
	if calls != 40 || admitted != 40 {
		t.Errorf("metrics: the workers counted %v answered calls, the api %v admissions; want 40 and 40", calls, admitted)
	}
	if st.MaxInFlight > maxConc {
		t.Fatalf("the fake saw %d calls at once; max_concurrency is %d", st.MaxInFlight, maxConc)
	}
	// sluice's own pacing: in any window, at most burst (3 s of the limit)
	// plus the refill of the window were sent.
	var at []time.Time
	for _, r := range st.Log {
		at = append(at, r.At)
	}
	burst := float64(rpm) * 3 / 60
	for i := range at {
		for j := i; j < len(at); j++ {
			n := float64(j - i + 1)
			allowed := burst + at[j].Sub(at[i]).Seconds()*rpm/60 + 1 // +1: clock skew between Redis TIME and the fake
			if n > allowed {
				t.Fatalf("%v requests within %s: more than the %.1f the limiter allows", n, at[j].Sub(at[i]), allowed)
			}
		}
	}
}

func TestKilledWorkersJobCompletesAndSlotReturns(t *testing.T) {
	c := startCluster(t, fakeanthropic.Group{Name: "sonnet", Models: []string{"claude-sonnet-*"}, RPM: 1000, InputTPM: 1000000, OutputTPM: 1000000},
		1, fakeanthropic.Config{TokensPerSecond: 20}, "  lease_ttl: 2s\n")
	victim := c.start(t, "worker")
	v := c.submit(t, "alice", "tell me a long story [[reply_tokens=40]]", 100)
	harness.Eventually(t, 20*time.Second, func() bool { return c.fake.Stats().InFlight == 1 }, "the call to start")
	victim.Kill(t) // SIGKILL: no cleanup at all
	c.start(t, "worker")
	got := c.waitAll(t, []string{v.ID}, 60*time.Second)[v.ID]
	if got.Status != jobs.Succeeded || got.Attempts != 2 || got.Usage.OutputTokens != 40 {
		t.Fatalf("job %s attempts %d usage %+v", got.Status, got.Attempts, got.Usage)
	}
	// A follower sees the crash: retrying (worker_lost) before the second
	// started, and the deltas after the last started are the answer.
	req, _ := http.NewRequest(http.MethodGet, c.api+"/v1/jobs/"+v.ID+"/events", nil)
	req.Header.Set("x-api-key", harness.TenantKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	evs := harness.ReadSSE(t, resp.Body, -1)
	resp.Body.Close()
	var names []string
	var text strings.Builder
	for _, ev := range evs {
		switch ev.Event {
		case "delta":
			var d struct{ Text string }
			_ = json.Unmarshal([]byte(ev.Data), &d)
			text.WriteString(d.Text)
			continue
		case "started":
			text.Reset()
		case "retrying":
			var d struct {
				Attempt int
				Reason  string
			}
			if err := json.Unmarshal([]byte(ev.Data), &d); err != nil || d.Reason != "worker_lost" || d.Attempt != 1 {
				t.Errorf("retrying event %s, want attempt 1, reason worker_lost", ev.Data)
			}
		}
		names = append(names, ev.Event)
	}
	if want := "queued started retrying started succeeded"; strings.Join(names, " ") != want {
		t.Errorf("events %v, want %s (deltas left out)", names, want)
	}
	if got.Text == nil || text.String() != *got.Text {
		t.Errorf("the deltas after the last started make %q; the answer is %v", text.String(), got.Text)
	}
	// The slot comes back and the reservation is settled once (the worker
	// settles just after it records the job's success).
	rdb := c.redis.Client(t)
	ctx := context.Background()
	harness.Eventually(t, 10*time.Second, func() bool {
		leases, _ := rdb.ZCard(ctx, "sluice:lim:sonnet:leases").Result()
		open, _ := rdb.HLen(ctx, "sluice:lim:sonnet:res").Result()
		return leases == 0 && open == 0
	}, "the lease to be released and the reservation settled")
	if n := c.fake.Stats().Requests; n != 2 {
		t.Fatalf("upstream calls = %d, want 2 (the killed one and the retry)", n)
	}
}

func TestUpstream429FreezesEveryProcess(t *testing.T) {
	c := startCluster(t, fakeanthropic.Group{Name: "sonnet", Models: []string{"claude-sonnet-*"}, RPM: 6000, InputTPM: 1000000, OutputTPM: 1000000},
		1, fakeanthropic.Config{TokensPerSecond: 0, ReplyTokens: 3}, "")
	c.start(t, "worker")
	c.start(t, "worker")
	c.fake.QueueFaults(fakeanthropic.FaultRule{Kind: fakeanthropic.FaultRateLimit, RetryAfter: 2 * time.Second})
	var ids []string
	for i := range 6 {
		ids = append(ids, c.submit(t, fmt.Sprintf("u%d", i), "hi", 20).ID)
	}
	done := c.waitAll(t, ids, 60*time.Second)
	for _, v := range done {
		if v.Status != jobs.Succeeded {
			t.Fatalf("job %s %+v", v.Status, v.Error)
		}
	}
	log := c.fake.Stats().Log
	var limited time.Time
	for _, r := range log {
		if r.Status == 429 {
			limited = r.At
		}
	}
	if limited.IsZero() {
		t.Fatal("no 429 was sent")
	}
	for _, r := range log {
		if r.At.After(limited) && r.At.Before(limited.Add(2*time.Second)) {
			t.Fatalf("a request %s after the 429 (retry-after 2 s): %+v", r.At.Sub(limited), r)
		}
	}
}

func TestMain(m *testing.M) {
	code := m.Run()
	proctest.Cleanup()
	os.Exit(code)
}

// scrapeMetric reads one series from base's /metrics (0 when absent).
func scrapeMetric(t testing.TB, base, series string) float64 {
	t.Helper()
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s/metrics: %d", base, resp.StatusCode)
	}
	v, _ := harness.Metric(string(b), series)
	return v
}
