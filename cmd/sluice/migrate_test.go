package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/redistest"
	"github.com/sluice-dev/sluice/internal/rkeys"
	"github.com/sluice-dev/sluice/jobs"
)

// toLegacy renames every key of the current layout to the name an earlier
// release gave it (no hash tags; quota keys without the user id's length;
// usage statistics and the layout mark as they were then): a Redis as
// that release left it.
func toLegacy(t *testing.T, rdb *redis.Client) {
	t.Helper()
	ctx := context.Background()
	keys, err := rdb.Keys(ctx, rkeys.Prefix+"{*").Result()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		rest := k[strings.Index(k, "}:")+2:]
		old := rkeys.Prefix + rest
		switch {
		case strings.HasPrefix(rest, "quota:"):
			// quota:<tenant>:<len>:<user> → quota:<tenant>:<user>
			parts := strings.SplitN(rest, ":", 4)
			old = rkeys.Prefix + "quota:" + parts[1] + ":" + parts[3]
		case strings.HasPrefix(rest, "qgiven:"), strings.HasPrefix(rest, "usage:"):
			if err := rdb.Del(ctx, k).Err(); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := rdb.Rename(ctx, k, old).Err(); err != nil {
			t.Fatalf("rename %s → %s: %v", k, old, err)
		}
	}
	if err := rdb.Del(ctx, rkeys.Layout).Err(); err != nil {
		t.Fatal(err)
	}
}

// runOnce runs a sluice command to its end and returns its output and error.
func runOnce(t *testing.T, env func(string) string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out, errOut harness.SyncBuffer
	err := run(ctx, args, env, &out, &errOut)
	return out.String() + errOut.String(), err
}

// An upgrade on a Redis that an earlier release used: the new release
// refuses to start and names "sluice migrate"; migrate refuses while
// workers run or jobs wait, counts without changing anything in a dry
// run, then moves the keys; afterwards every finished job, its events,
// the job lists, an Idempotency-Key and a quota bucket read as before.
func TestMigrateFromTheOldLayout(t *testing.T) {
	r := redistest.Start(t)
	rdb := r.Client(t)
	ctx := context.Background()
	_, fsrv := startFake(t)
	path := writeConfig(t, r.URL, fsrv.URL)
	env := func(k string) string {
		if k == "ANTHROPIC_API_KEY" {
			return harness.UpstreamKey
		}
		return ""
	}
	args := []string{"serve", "--config", path, "--listen", "127.0.0.1:0"}
	base, _, stop := startRun(t, args, env)

	submit := func(base, user, text, idem string) (jobs.View, int) {
		body := fmt.Sprintf(`{"user_id":%q,"request":{"model":"claude-sonnet-4-6","max_tokens":20,"messages":[{"role":"user","content":%q}]}}`, user, text)
		req, _ := http.NewRequest(http.MethodPost, base+"/v1/jobs", strings.NewReader(body))
		req.Header.Set("x-api-key", harness.TenantKey)
		if idem != "" {
			req.Header.Set("Idempotency-Key", idem)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var v jobs.View
		_ = json.NewDecoder(resp.Body).Decode(&v)
		return v, resp.StatusCode
	}
	get := func(base, path string) (int, string) {
		req, _ := http.NewRequest(http.MethodGet, base+path, nil)
		req.Header.Set("x-api-key", harness.TenantKey)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	var ids []string
	for i, u := range []string{"ann", "ann", "b:ob"} {
		idem := ""
		if i == 0 {
			idem = "first"
		}
		v, code := submit(base, u, fmt.Sprintf("question %d", i), idem)
		if code != http.StatusAccepted {
			t.Fatalf("submit %d = %d", i, code)
		}
		ids = append(ids, v.ID)
	}
	before := map[string]jobs.View{}
	harness.Eventually(t, 20*time.Second, func() bool {
		for _, id := range ids {
			_, b := get(base, "/v1/jobs/"+id)
			var v jobs.View
			_ = json.Unmarshal([]byte(b), &v)
			if v.Status != jobs.Succeeded {
				return false
			}
			before[id] = v
		}
		return true
	}, "the three jobs to succeed")

	// While a worker runs, migrate changes nothing.
	out, err := runOnce(t, env, "migrate", "--config", path)
	if err == nil || !strings.Contains(err.Error(), "worker process(es) still run against this Redis") {
		t.Fatalf("migrate beside a running worker: %v\n%s", err, out)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}

	toLegacy(t, rdb)
	// A quota bucket as the earlier release kept it.
	if err := rdb.HSet(ctx, rkeys.Prefix+"quota:acme:b:ob", "r", "7", "t", "900", "ts", "1").Err(); err != nil {
		t.Fatal(err)
	}

	// This release refuses the old layout and says what to do.
	if out, err := runOnce(t, env, args...); err == nil || !strings.Contains(err.Error(), `run "sluice migrate" once`) {
		t.Fatalf("serve on the old layout: %v\n%s", err, out)
	}

	// A job still queued in the old layout stops the migration.
	if err := rdb.HSet(ctx, rkeys.Prefix+"live:sonnet", "job_waiting", "qacme:ann").Err(); err != nil {
		t.Fatal(err)
	}
	out, err = runOnce(t, env, "migrate", "--config", path)
	if err == nil || !strings.Contains(err.Error(), "1 job(s) of the earlier release are still queued or running (sonnet: 1)") {
		t.Fatalf("migrate with a queued job: %v\n%s", err, out)
	}
	if n, _ := rdb.Exists(ctx, rkeys.Prefix+"job:"+ids[0]).Result(); n != 1 {
		t.Fatal("a refused migration moved a job record")
	}
	rdb.HDel(ctx, rkeys.Prefix+"live:sonnet", "job_waiting")

	// A dry run counts and changes nothing.
	out, err = runOnce(t, env, "migrate", "--config", path, "--dry-run")
	if err != nil || !strings.Contains(out, "Would move") || !strings.Contains(out, "3 job records") || !strings.Contains(out, "Dry run") {
		t.Fatalf("dry run: %v\n%s", err, out)
	}
	if n, _ := rdb.Exists(ctx, rkeys.Prefix+"job:"+ids[0]).Result(); n != 1 {
		t.Fatal("a dry run moved a job record")
	}

	out, err = runOnce(t, env, "migrate", "--config", path)
	if err != nil || !strings.Contains(out, "Moved") || !strings.Contains(out, "3 job records") ||
		!strings.Contains(out, "3 job event logs") || !strings.Contains(out, "1 Idempotency-Keys") || !strings.Contains(out, "1 quota buckets") {
		t.Fatalf("migrate: %v\n%s", err, out)
	}
	t.Logf("sluice migrate:\n%s", out)
	if err := scanLegacy(ctx, rdb, func(k string) error { t.Errorf("left in the old layout: %s", k); return nil }); err != nil {
		t.Fatal(err)
	}
	out, err = runOnce(t, env, "migrate", "--config", path)
	if err != nil || !strings.Contains(out, "nothing to migrate") {
		t.Fatalf("second migrate: %v\n%s", err, out)
	}
	if got, _ := rdb.HGet(ctx, rkeys.Quota("acme", "b:ob"), "t").Result(); got != "900" {
		t.Errorf("quota bucket after migrate: t=%q, want 900", got)
	}

	// The new release serves the old data.
	base, _, _ = startRun(t, args, env)
	for _, id := range ids {
		code, b := get(base, "/v1/jobs/"+id)
		var v jobs.View
		_ = json.Unmarshal([]byte(b), &v)
		if code != http.StatusOK || v.Status != jobs.Succeeded || v.Text == nil || *v.Text != *before[id].Text {
			t.Errorf("GET %s after migrate = %d %s", id, code, b)
		}
		code, b = get(base, "/v1/jobs/"+id+"/events")
		if code != http.StatusOK || !strings.Contains(b, "event: succeeded") || !strings.Contains(b, "event: delta") {
			t.Errorf("events of %s after migrate = %d %s", id, code, b)
		}
	}
	for user, want := range map[string]int{"ann": 2, "b:ob": 1} {
		_, b := get(base, "/v1/jobs?user_id="+user)
		var list struct{ Jobs []jobs.View }
		_ = json.Unmarshal([]byte(b), &list)
		if len(list.Jobs) != want {
			t.Errorf("list of %s after migrate: %d jobs, want %d: %s", user, len(list.Jobs), want, b)
		}
	}
	v, code := submit(base, "ann", "question 0", "first")
	if code != http.StatusOK && code != http.StatusAccepted || v.ID != ids[0] {
		t.Errorf("the Idempotency-Key after migrate answered %d with job %s, want %s", code, v.ID, ids[0])
	}
	// And new work runs.
	v, code = submit(base, "ann", "after the upgrade", "")
	if code != http.StatusAccepted {
		t.Fatalf("submit after migrate = %d", code)
	}
	harness.Eventually(t, 20*time.Second, func() bool {
		_, b := get(base, "/v1/jobs/"+v.ID)
		return strings.Contains(b, `"status":"succeeded"`)
	}, "a new job to succeed after the migration")
}

// dev's own Redis (a scratch Redis in its data folder) is migrated at
// start rather than refused.
func TestDevMigratesItsOwnRedis(t *testing.T) {
	r := redistest.Start(t)
	rdb := r.Client(t)
	ctx := context.Background()
	id := "job_" + strings.Repeat("a", 26)
	rdb.HSet(ctx, rkeys.Prefix+"job:"+id, "group", "sonnet", "status", "succeeded", "tenant", "acme", "user_id", "ann")
	rdb.ZAdd(ctx, rkeys.Prefix+"user:acme:ann:jobs", redis.Z{Score: 1, Member: id})
	_, fsrv := startFake(t)
	cfg, err := config.Parse([]byte(harness.BaseConfig(r.URL, fsrv.URL)), func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	cfg.Listen = "127.0.0.1:0"
	runCtx, cancel := context.WithCancel(ctx)
	var stderr harness.SyncBuffer
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- serve(runCtx, cfg, roles{api: true, worker: true, ownRedis: t.TempDir()}, io.Discard, &stderr, func(string) { close(ready) })
	}()
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("dev's serve ended: %v\n%s", err, stderr.String())
	case <-time.After(20 * time.Second):
		t.Fatalf("dev's serve did not start:\n%s", stderr.String())
	}
	cancel()
	<-done
	if !strings.Contains(stderr.String(), "migrating it") {
		t.Errorf("dev did not say it migrated:\n%s", stderr.String())
	}
	if g, _ := rdb.HGet(ctx, rkeys.Job(id), "group").Result(); g != "sonnet" {
		t.Errorf("the job record was not moved (group %q)", g)
	}
	if n, _ := rdb.ZCard(ctx, rkeys.UserJobs("sonnet", "acme", "ann")).Result(); n != 1 {
		t.Errorf("the user's list holds %d jobs after the migration, want 1", n)
	}
}
