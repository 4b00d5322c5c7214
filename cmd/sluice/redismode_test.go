package main

import (
	"bytes"
	"context"
	"net/http"
	"strings"
	"testing"

	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/redistest"
)

// In sentinel mode the api finds the primary through the sentinels, and
// asynqmon (which builds its own client) does too.
func TestSentinelModeServes(t *testing.T) {
	s := redistest.StartSentinel(t, redistest.SentinelOptions{})
	_, fsrv := startFake(t)
	path := writeConfig(t, "redis://unused:6379/0", fsrv.URL)
	env := func(k string) string {
		switch k {
		case "REDIS_MODE":
			return "sentinel"
		case "REDIS_URL":
			return s.URL
		case "ANTHROPIC_API_KEY":
			return harness.UpstreamKey
		}
		return ""
	}
	base, stderr, _ := startRun(t, []string{"serve", "--config", path, "--listen", "127.0.0.1:0"}, env)
	if !strings.Contains(stderr.String(), "redis.mode") || !strings.Contains(stderr.String(), "sentinel") {
		t.Errorf("the printed configuration lacks redis.mode sentinel:\n%s", stderr)
	}
	for _, p := range []string{"/readyz", "/monitoring/api/queues"} {
		req, _ := http.NewRequest(http.MethodGet, base+p, nil)
		req.Header.Set("x-api-key", harness.AdminKey)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("%s = %d, want 200", p, resp.StatusCode)
		}
	}
	// A job goes through, on the primary the sentinels named.
	req, _ := http.NewRequest(http.MethodPost, base+"/v1/jobs", strings.NewReader(`{"user_id":"u","request":{"model":"claude-sonnet-4-6","max_tokens":20,"messages":[{"role":"user","content":"hi"}]}}`))
	req.Header.Set("x-api-key", harness.TenantKey)
	req.Header.Set("content-type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("submit = %d", resp.StatusCode)
	}
	if n, err := s.Primary.Client(t).DBSize(context.Background()).Result(); err != nil || n == 0 {
		t.Errorf("the primary holds %d keys (%v)", n, err)
	}
}

// A cluster URL with a database, and a Sentinel URL without master_name,
// stop start-up with the fix.
func TestRedisModeRefusals(t *testing.T) {
	path := writeConfig(t, "redis://127.0.0.1:1/0", "http://127.0.0.1:1")
	for _, tc := range []struct{ mode, url, want string }{
		{"cluster", "redis://127.0.0.1:7000/2?addr=127.0.0.1:7001", "Redis Cluster has database 0 only"},
		{"sentinel", "redis://127.0.0.1:26379/0", "add ?master_name=NAME"},
		{"ring", "redis://127.0.0.1:6379/0", `redis.mode: must be "single"`},
	} {
		env := func(k string) string {
			switch k {
			case "REDIS_MODE":
				return tc.mode
			case "REDIS_URL":
				return tc.url
			}
			return ""
		}
		err := run(context.Background(), []string{"api", "--config", path}, env, &bytes.Buffer{}, &bytes.Buffer{})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("mode %s: %v, want an error with %q", tc.mode, err, tc.want)
		}
	}
}
