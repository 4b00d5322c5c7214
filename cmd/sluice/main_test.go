package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/redistest"
	"github.com/sluice-dev/sluice/jobs"
)

var listenRE = regexp.MustCompile(`(?:msg=listening what=api addr=|"msg":"listening","what":"api","addr":")(http://[0-9.:]+)`)

// startRun runs the real run() with args and returns the api's base URL once
// /healthz answers.
func startRun(t *testing.T, args []string, getenv func(string) string) (base string, stderr *harness.SyncBuffer, stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	stdout, stderr := &harness.SyncBuffer{}, &harness.SyncBuffer{}
	done := make(chan error, 1)
	go func() { done <- run(ctx, args, getenv, stdout, stderr) }()
	harness.Eventually(t, 20*time.Second, func() bool {
		select {
		case err := <-done:
			t.Fatalf("run ended early: %v\n%s", err, stderr)
		default:
		}
		m := listenRE.FindStringSubmatch(stderr.String())
		if m == nil {
			return false
		}
		base = m[1]
		resp, err := http.Get(base + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}, "the api to listen and answer /healthz")
	var once sync.Once
	var stopErr error
	stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case stopErr = <-done:
			case <-time.After(30 * time.Second):
				stopErr = errors.New("run did not return within 30s of its context ending")
			}
		})
		return stopErr
	}
	t.Cleanup(func() { _ = stop() })
	return base, stderr, stop
}

// writeConfig writes the harness configuration for a Redis and an upstream
// to a file and returns its path.
func writeConfig(t *testing.T, redisURL, upstreamURL string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "sluice.yaml")
	if err := os.WriteFile(path, []byte(harness.BaseConfig(redisURL, upstreamURL)), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// startFake serves a fake upstream with roomy limits for group "sonnet".
func startFake(t *testing.T) (*fakeanthropic.Server, *httptest.Server) {
	t.Helper()
	fake, err := fakeanthropic.New(fakeanthropic.Config{
		Groups:  []fakeanthropic.Group{{Name: "sonnet", Models: []string{"claude-sonnet-*"}, RPM: 1000, InputTPM: 1000000, OutputTPM: 1000000}},
		APIKeys: []string{harness.UpstreamKey},
	})
	if err != nil {
		t.Fatal(err)
	}
	fsrv := httptest.NewServer(fake)
	t.Cleanup(fsrv.Close)
	return fake, fsrv
}

func TestServeEndToEnd(t *testing.T) {
	r := redistest.Start(t)
	fake, fsrv := startFake(t)
	path := writeConfig(t, "redis://127.0.0.1:1/0", "http://127.0.0.1:1")
	env := map[string]string{
		"REDIS_URL":          r.URL, // the environment beats the file
		"ANTHROPIC_BASE_URL": fsrv.URL,
		"ANTHROPIC_API_KEY":  harness.UpstreamKey,
	}
	base, stderr, stop := startRun(t, []string{"serve", "--config", path, "--listen", "127.0.0.1:0"}, func(k string) string { return env[k] })

	body := `{"user_id":"alice","request":{"model":"claude-sonnet-4-6","max_tokens":50,"messages":[{"role":"user","content":"Hello [[reply_tokens=6]]"}]}}`
	req, _ := http.NewRequest(http.MethodPost, base+"/v1/jobs", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+harness.TenantKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var v jobs.View
	_ = json.NewDecoder(resp.Body).Decode(&v)
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("submit: %d", resp.StatusCode)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	req, _ = http.NewRequestWithContext(ctx, http.MethodGet, base+"/v1/jobs/"+v.ID+"/events?token="+v.Token, nil)
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	evs := harness.ReadSSE(t, resp.Body, -1)
	resp.Body.Close()
	var seen []string
	var text strings.Builder
	for _, ev := range evs {
		if len(seen) == 0 || seen[len(seen)-1] != ev.Event {
			seen = append(seen, ev.Event)
		}
		if ev.Event == "delta" {
			var d struct{ Text string }
			_ = json.Unmarshal([]byte(ev.Data), &d)
			text.WriteString(d.Text)
		}
	}
	if got := strings.Join(seen, " "); got != "queued started delta succeeded" {
		t.Fatalf("events: %s", got)
	}

	req, _ = http.NewRequest(http.MethodGet, base+"/v1/jobs/"+v.ID, nil)
	req.Header.Set("x-api-key", harness.TenantKey)
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var got jobs.View
	_ = json.NewDecoder(resp.Body).Decode(&got)
	resp.Body.Close()
	rec := fake.Stats().Log[0]
	if got.Text == nil || *got.Text != text.String() || got.Usage.OutputTokens != rec.OutputTokens || got.Usage.InputTokens != rec.InputTokens {
		t.Fatalf("job text %v usage %+v; streamed %q; upstream said %+v", got.Text, got.Usage, text.String(), rec)
	}
	if err := stop(); err != nil {
		t.Fatalf("run: %v", err)
	}
	if out := stderr.String(); strings.Contains(out, harness.UpstreamKey) || strings.Contains(out, harness.TenantKey) || strings.Contains(out, harness.AdminKey) {
		t.Fatal("a secret was printed")
	}
}

func TestMonitoringNeedsAdminKey(t *testing.T) {
	r := redistest.Start(t)
	path := writeConfig(t, r.URL, "http://127.0.0.1:1")
	base, _, _ := startRun(t, []string{"api", "--config", path, "--listen", "127.0.0.1:0"}, func(string) string { return "" })
	for _, tc := range []struct {
		name   string
		set    func(*http.Request)
		status int
	}{
		{"none", func(*http.Request) {}, 401},
		{"tenant key", func(r *http.Request) { r.Header.Set("x-api-key", harness.TenantKey) }, 401},
		{"admin x-api-key", func(r *http.Request) { r.Header.Set("x-api-key", harness.AdminKey) }, 200},
		{"admin basic auth", func(r *http.Request) { r.SetBasicAuth("ops", harness.AdminKey) }, 200},
	} {
		for _, path := range []string{"/monitoring/", "/debug/pprof/", "/debug/pprof/heap", "/dashboard", "/v1/admin/usage", "/v1/admin/status"} {
			req, _ := http.NewRequest(http.MethodGet, base+path, nil)
			tc.set(req)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != tc.status {
				t.Errorf("%s: %s = %d, want %d", tc.name, path, resp.StatusCode, tc.status)
			}
			if tc.status == 401 && !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Basic") {
				t.Errorf("%s: %s: no basic-auth challenge for browsers", tc.name, path)
			}
		}
	}
}

func TestBadConfigListsEveryProblem(t *testing.T) {
	path := filepath.Join(t.TempDir(), "bad.yaml")
	bad := `tenants:
  - name: acme
    keys: ["short"]
model_groups:
  - name: a
    models: ["claude-*"]
    rpm: 0
    input_tpm: 10
    output_tpm: 10
  - name: b
    models: ["claude-haiku-*"]
    rpm: 5
    input_tpm: -1
    output_tpm: 10
`
	if err := os.WriteFile(path, []byte(bad), 0o600); err != nil {
		t.Fatal(err)
	}
	err := run(context.Background(), []string{"serve", "--config", path}, func(string) string { return "" }, &bytes.Buffer{}, &bytes.Buffer{})
	if err == nil {
		t.Fatal("a bad config must stop start-up")
	}
	for _, want := range []string{"tenants[0].keys[0]", "model_groups[0].rpm", "model_groups[1].input_tpm"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not name %s:\n%v", want, err)
		}
	}
}

func TestHelpOfEveryCommand(t *testing.T) {
	for _, cmd := range []string{"serve", "api", "worker", "dev", "fake-anthropic", "keygen", "healthcheck"} {
		var stderr bytes.Buffer
		err := run(context.Background(), []string{cmd, "--help"}, func(string) string { return "" }, &bytes.Buffer{}, &stderr)
		if !errors.Is(err, flag.ErrHelp) {
			t.Errorf("%s --help: err = %v", cmd, err)
		}
		switch out := stderr.String(); cmd {
		case "keygen": // not a server: no --listen
			if !strings.Contains(out, "sha256") || !strings.Contains(out, "--prefix") {
				t.Errorf("keygen --help does not document the sha256 form and --prefix:\n%s", out)
			}
		case "healthcheck":
			if !strings.Contains(out, "--url") || !strings.Contains(out, "/readyz") {
				t.Errorf("healthcheck --help does not document --url:\n%s", out)
			}
		default:
			if !strings.Contains(out, "--listen") || !strings.Contains(out, "LISTEN") {
				t.Errorf("%s --help does not document --listen and its variable:\n%s", cmd, out)
			}
		}
	}
	if err := run(context.Background(), []string{"nope"}, func(string) string { return "" }, &bytes.Buffer{}, &bytes.Buffer{}); err == nil {
		t.Error("an unknown command must fail")
	}
}

func TestShutdownEndsEventStreams(t *testing.T) {
	r := redistest.Start(t)
	path := writeConfig(t, r.URL, "http://127.0.0.1:1")
	base, _, stop := startRun(t, []string{"api", "--config", path, "--listen", "127.0.0.1:0"}, func(string) string { return "" })
	body := `{"user_id":"alice","request":{"model":"claude-sonnet-4-6","messages":[{"role":"user","content":"hi"}]}}`
	req, _ := http.NewRequest(http.MethodPost, base+"/v1/jobs", strings.NewReader(body))
	req.Header.Set("x-api-key", harness.TenantKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var v jobs.View
	_ = json.NewDecoder(resp.Body).Decode(&v)
	resp.Body.Close()
	// No worker runs: the job waits, and its event stream stays open.
	resp, err = http.Get(base + "/v1/jobs/" + v.ID + "/events?token=" + v.Token)
	if err != nil {
		t.Fatal(err)
	}
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}()
	// The api stops within its shutdown budget (5 s in this config), and
	// the open stream ends with it.
	stopped := make(chan error, 1)
	go func() { stopped <- stop() }()
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(7 * time.Second):
		t.Fatal("the api did not stop within its 5 s shutdown budget (+2 s)")
	}
	select {
	case <-ended:
	case <-time.After(2 * time.Second):
		t.Fatal("the event stream was left open after shutdown")
	}
}
