package main

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/redistest"
)

// guardEnv is the environment for a run against r, with the upstream
// nowhere (no job runs in these tests).
func guardEnv(r *redistest.Server, extra map[string]string) func(string) string {
	env := map[string]string{"REDIS_URL": r.URL, "ANTHROPIC_API_KEY": harness.UpstreamKey}
	for k, v := range extra {
		env[k] = v
	}
	return func(k string) string { return env[k] }
}

// writeGuardConfig is writeConfig with a fast eviction re-check.
func writeGuardConfig(t *testing.T) string {
	t.Helper()
	path := writeConfig(t, "redis://127.0.0.1:1/0", "http://127.0.0.1:1")
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString("redis:\n  check_interval: 50ms\n"); err != nil {
		t.Fatal(err)
	}
	return path
}

// getJSON gets url (with the admin key) and decodes its JSON body.
func getJSON(t *testing.T, url string) (int, map[string]any) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	req.Header.Set("Authorization", "Bearer "+harness.AdminKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		t.Fatalf("GET %s: %d, not JSON: %v", url, resp.StatusCode, err)
	}
	return resp.StatusCode, body
}

func getText(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// checkEvictingReadyz wants /readyz at base to fail and name the policy.
func checkEvictingReadyz(t *testing.T, base, policy string) {
	t.Helper()
	code, body := getJSON(t, base+"/readyz")
	if code != http.StatusServiceUnavailable || body["status"] != "unavailable" || body["redis"] != "evicting" || body["maxmemory_policy"] != policy {
		t.Errorf("/readyz on an evicting Redis: %d %v; want 503 naming %s", code, body, policy)
	}
	if msg, _ := body["message"].(string); !strings.Contains(msg, policy) || !strings.Contains(msg, "noeviction") {
		t.Errorf("/readyz message %q does not say the policy and the fix", msg)
	}
}

// A Redis that evicts keys stops start-up with a message that says what,
// why and how to fix or override it.
func TestEvictingRedisRefusedAtStart(t *testing.T) {
	r := redistest.StartArgs(t, "--maxmemory-policy", "allkeys-lru")
	path := writeConfig(t, r.URL, "http://127.0.0.1:1")
	for _, role := range []string{"serve", "worker"} {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		var stderr harness.SyncBuffer
		err := run(ctx, []string{role, "--config", path, "--listen", "127.0.0.1:0"}, guardEnv(r, nil), &harness.SyncBuffer{}, &stderr)
		ended := ctx.Err()
		cancel()
		if err == nil {
			t.Fatalf("%s started on an allkeys-lru Redis", role)
		}
		if ended != nil {
			t.Fatalf("%s: run returned only when its context ended: %v", role, err)
		}
		for _, want := range []string{"allkeys-lru", "refuses to start", "accepted jobs", "CONFIG SET maxmemory-policy noeviction",
			"redis.conf", "--allow-evicting-redis", "SLUICE_ALLOW_EVICTING_REDIS=true", "redis.allow_evicting: true"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("%s: the refusal does not say %q:\n%v", role, want, err)
			}
		}
		if strings.Contains(stderr.String(), "msg=listening") {
			t.Errorf("%s listened before refusing:\n%s", role, stderr.String())
		}
	}
}

// With --allow-evicting-redis sluice starts, warns loudly, and /readyz,
// /metrics and the admin status say Redis evicts.
func TestEvictingRedisAllowedByFlag(t *testing.T) {
	r := redistest.StartArgs(t, "--maxmemory-policy", "allkeys-lru")
	path := writeGuardConfig(t)
	base, stderr, stop := startRun(t, []string{"serve", "--config", path, "--listen", "127.0.0.1:0", "--allow-evicting-redis"}, guardEnv(r, nil))

	if logs := stderr.String(); !strings.Contains(logs, "REDIS EVICTS KEYS") || !strings.Contains(logs, "maxmemory_policy=allkeys-lru") ||
		!strings.Contains(logs, "level=WARN") {
		t.Errorf("no loud warning about the evicting Redis:\n%s", logs)
	}
	checkEvictingReadyz(t, base, "allkeys-lru")
	if m := getText(t, base+"/metrics"); !strings.Contains(m, "\nsluice_redis_eviction_policy_ok 0\n") ||
		!strings.Contains(m, "\nsluice_redis_maxmemory_bytes 0\n") || !regexp.MustCompile(`\nsluice_redis_used_memory_bytes [1-9]`).MatchString(m) {
		t.Errorf("/metrics does not report the evicting Redis:\n%s", grepLines(m, "sluice_redis_"))
	}
	code, status := getJSON(t, base+"/v1/admin/status")
	rs, _ := status["redis"].(map[string]any)
	if code != http.StatusOK || rs == nil || rs["ok"] != false || rs["maxmemory_policy"] != "allkeys-lru" {
		t.Errorf("/v1/admin/status: %d, redis %v; want ok false, allkeys-lru", code, rs)
	}

	// Fixed while running: ready again, without a restart.
	if err := r.Client(t).ConfigSet(context.Background(), "maxmemory-policy", "noeviction").Err(); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 10*time.Second, func() bool { code, _ := getJSON(t, base+"/readyz"); return code == http.StatusOK }, "/readyz to pass once Redis is noeviction")
	if _, status := getJSON(t, base+"/v1/admin/status"); status["redis"].(map[string]any)["ok"] != true {
		t.Errorf("admin status after the fix: %v", status["redis"])
	}
	if err := stop(); err != nil {
		t.Errorf("run: %v", err)
	}
}

// SLUICE_ALLOW_EVICTING_REDIS overrides too, and a worker's /readyz fails
// the same way.
func TestEvictingRedisWorkerReadyz(t *testing.T) {
	r := redistest.StartArgs(t, "--maxmemory-policy", "volatile-lru")
	path := writeGuardConfig(t)
	ctx, cancel := context.WithCancel(context.Background())
	var stderr harness.SyncBuffer
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"worker", "--config", path, "--listen", "127.0.0.1:0"},
			guardEnv(r, map[string]string{"SLUICE_ALLOW_EVICTING_REDIS": "true"}), &harness.SyncBuffer{}, &stderr)
	}()
	defer func() {
		cancel()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Error("the worker did not stop within 30s")
		}
	}()
	workerRE := regexp.MustCompile(`msg=listening what="worker health" addr=(http://[0-9.:]+)`)
	var base string
	harness.Eventually(t, 20*time.Second, func() bool {
		select {
		case err := <-done:
			t.Fatalf("worker ended early: %v\n%s", err, stderr.String())
		default:
		}
		m := workerRE.FindStringSubmatch(stderr.String())
		if m != nil {
			base = m[1]
		}
		return m != nil
	}, "the worker's health endpoint to listen")
	if !strings.Contains(stderr.String(), "REDIS EVICTS KEYS") {
		t.Errorf("no loud warning:\n%s", stderr.String())
	}
	checkEvictingReadyz(t, base, "volatile-lru")
	if m := getText(t, base+"/metrics"); !strings.Contains(m, "\nsluice_redis_eviction_policy_ok 0\n") {
		t.Errorf("the worker's /metrics does not report the policy:\n%s", grepLines(m, "sluice_redis_"))
	}
}

// On a noeviction Redis /readyz passes, and the gauges say so.
func TestReadyzOnNoEvictionRedis(t *testing.T) {
	r := redistest.Start(t)
	base, stderr, _ := startRun(t, []string{"serve", "--config", writeGuardConfig(t), "--listen", "127.0.0.1:0"}, guardEnv(r, nil))
	if code, body := getJSON(t, base+"/readyz"); code != http.StatusOK || body["status"] != "ready" {
		t.Errorf("/readyz: %d %v", code, body)
	}
	if m := getText(t, base+"/metrics"); !strings.Contains(m, "\nsluice_redis_eviction_policy_ok 1\n") {
		t.Errorf("/metrics:\n%s", grepLines(m, "sluice_redis_"))
	}
	if strings.Contains(stderr.String(), "EVICTS") {
		t.Errorf("a warning on a noeviction Redis:\n%s", stderr.String())
	}

	// Turned evicting while running: /readyz fails, with one warning.
	if err := r.Client(t).ConfigSet(context.Background(), "maxmemory-policy", "allkeys-random").Err(); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 10*time.Second, func() bool { code, _ := getJSON(t, base+"/readyz"); return code == http.StatusServiceUnavailable }, "/readyz to fail")
	checkEvictingReadyz(t, base, "allkeys-random")
	if n := strings.Count(stderr.String(), "REDIS EVICTS KEYS"); n != 1 {
		t.Errorf("the change was logged %d times, want once:\n%s", n, stderr.String())
	}
}

func grepLines(s, substr string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
