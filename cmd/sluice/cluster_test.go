package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/redistest"
	"github.com/sluice-dev/sluice/internal/rkeys"
	"github.com/sluice-dev/sluice/jobs"
)

// groupBeside is a model group name ("haiku0", "haiku1", …) whose engine
// lives on another primary of rc than group g's.
func groupBeside(tb testing.TB, rc *redistest.Cluster, g string) string {
	tb.Helper()
	for i := 0; ; i++ {
		name := fmt.Sprintf("haiku%d", i)
		if rc.MasterFor(tb, rkeys.Limiter(name)) != rc.MasterFor(tb, rkeys.Limiter(g)) {
			return name
		}
	}
}

// In cluster mode sluice runs on three primaries: two model groups whose
// engines live on different shards, a user's hourly quota in a third slot
// charged by both, listings and usage statistics merged across slots, and
// asynqmon on the cluster.
func TestClusterModeServes(t *testing.T) {
	rc := redistest.StartCluster(t, redistest.ClusterOptions{Masters: 3})
	groups := []string{"sonnet", groupBeside(t, rc, "sonnet")}
	fake, err := fakeanthropic.New(fakeanthropic.Config{
		Groups: []fakeanthropic.Group{
			{Name: "sonnet", Models: []string{"claude-sonnet-*"}, RPM: 1000, InputTPM: 1000000, OutputTPM: 1000000},
			{Name: "haiku", Models: []string{"claude-haiku-*"}, RPM: 1000, InputTPM: 1000000, OutputTPM: 1000000},
		},
		APIKeys: []string{harness.UpstreamKey},
	})
	if err != nil {
		t.Fatal(err)
	}
	fsrv := httptest.NewServer(fake)
	t.Cleanup(fsrv.Close)
	cfg := fmt.Sprintf(`admin_keys: [%q]
tenants:
  - name: acme
    keys: [%q]
    requests_per_hour: 5
model_groups:
  - name: sonnet
    models: ["claude-sonnet-*"]
    rpm: 1000
    input_tpm: 1000000
    output_tpm: 1000000
    max_concurrency: 4
  - name: %s
    models: ["claude-haiku-*"]
    rpm: 1000
    input_tpm: 1000000
    output_tpm: 1000000
    max_concurrency: 4
redis:
  mode: cluster
  wait_replicas: 0
api:
  shutdown_timeout: 5s
worker:
  shutdown_timeout: 5s
`, harness.AdminKey, harness.TenantKey, groups[1])
	path := filepath.Join(t.TempDir(), "sluice.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	env := func(k string) string {
		switch k {
		case "REDIS_URL":
			return rc.URL
		case "ANTHROPIC_BASE_URL":
			return fsrv.URL
		case "ANTHROPIC_API_KEY":
			return harness.UpstreamKey
		}
		return ""
	}
	base, _, _ := startRun(t, []string{"serve", "--config", path, "--listen", "127.0.0.1:0"}, env)

	do := func(method, path, key, body string) (int, []byte) {
		req, _ := http.NewRequest(method, base+path, strings.NewReader(body))
		req.Header.Set("x-api-key", key)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, b
	}
	// Five requests an hour for ann, spent across both groups: the sixth
	// is refused whichever group it asks.
	var ids []string
	for i := 0; i < 6; i++ {
		model := "claude-sonnet-4-6"
		if i%2 == 1 {
			model = "claude-haiku-4-5"
		}
		code, b := do(http.MethodPost, "/v1/jobs", harness.TenantKey,
			fmt.Sprintf(`{"user_id":"ann","request":{"model":%q,"max_tokens":20,"messages":[{"role":"user","content":"q%d"}]}}`, model, i))
		if i < 5 {
			if code != http.StatusAccepted {
				t.Fatalf("submit %d = %d %s", i, code, b)
			}
			var v jobs.View
			_ = json.Unmarshal(b, &v)
			ids = append(ids, v.ID)
			continue
		}
		if code != http.StatusTooManyRequests || !strings.Contains(string(b), "quota") {
			t.Fatalf("the sixth request of the hour = %d %s, want a 429 quota refusal", code, b)
		}
	}
	harness.Eventually(t, 30*time.Second, func() bool {
		for _, id := range ids {
			_, b := do(http.MethodGet, "/v1/jobs/"+id, harness.TenantKey, "")
			if !strings.Contains(string(b), `"status":"succeeded"`) {
				return false
			}
		}
		return true
	}, "five jobs over two groups to succeed")

	// The listing merges both groups, newest first.
	_, b := do(http.MethodGet, "/v1/jobs?user_id=ann", harness.TenantKey, "")
	var list struct{ Jobs []jobs.View }
	_ = json.Unmarshal(b, &list)
	if len(list.Jobs) != 5 || list.Jobs[0].ID != ids[4] || list.Jobs[4].ID != ids[0] {
		t.Errorf("list: %s", b)
	}
	// Usage statistics add up both groups' slots.
	code, b := do(http.MethodGet, "/v1/admin/usage?tenant=acme", harness.AdminKey, "")
	if code != http.StatusOK || !strings.Contains(string(b), `"requests":5`) {
		t.Errorf("usage = %d %s, want 5 requests", code, b)
	}
	// Each group's jobs live on its group's primary.
	ctx := context.Background()
	for i, id := range ids {
		g := groups[i%2]
		m := rc.MasterFor(t, rkeys.Job(id))
		if m != rc.MasterFor(t, rkeys.Limiter(g)) {
			t.Errorf("job %d (%s) lives on %s, not with its group's engine", i, g, m.Addr)
		}
		if n, err := m.Client(t).Exists(ctx, rkeys.Job(id)).Result(); err != nil || n != 1 {
			t.Errorf("job %d is not on %s: %v", i, m.Addr, err)
		}
	}
	for _, p := range []string{"/readyz", "/monitoring/api/queues"} {
		if code, b := do(http.MethodGet, p, harness.AdminKey, ""); code != http.StatusOK {
			t.Errorf("%s = %d %s", p, code, b)
		}
	}
}
