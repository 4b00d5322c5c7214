package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/jobs"
)

// TestBatchSurvivesWorkerKill: a worker process is SIGKILLed while the
// Message Batch it sent is processing; another worker process collects
// the batch's results, once: every job succeeds by batch after one
// attempt, the upstream saw one batch and no Messages call, and each job
// has one `started` and one `succeeded` event.
func TestBatchSurvivesWorkerKill(t *testing.T) {
	c := startClusterGroup(t, fakeanthropic.Group{Name: "sonnet", Models: []string{"claude-sonnet-*"}, RPM: 1000, InputTPM: 1e7, OutputTPM: 1e7},
		8, fakeanthropic.Config{BatchDelay: 3 * time.Second}, "",
		"    batch: true\n    batch_window: 5s\n    batch_max_jobs: 20\n    batch_poll: 200ms\n    batch_fallback_after: 30s\n", "")
	first := c.start(t, "worker")
	var ids []string
	tokens := map[string]string{}
	for i := range 20 {
		body := fmt.Sprintf(`{"user_id":"u%d","class":"background","deadline_seconds":7200,"request":{"model":%q,"max_tokens":100,"messages":[{"role":"user","content":"grade essay %d"}]}}`,
			i%4, harness.Model, i)
		req, _ := http.NewRequest(http.MethodPost, c.api+"/v1/jobs", strings.NewReader(body))
		req.Header.Set("x-api-key", harness.TenantKey)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusAccepted {
			t.Fatalf("submit: %d %s", resp.StatusCode, b)
		}
		var v jobs.View
		if err := json.Unmarshal(b, &v); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, v.ID)
		tokens[v.ID] = v.Token
	}
	harness.Eventually(t, 15*time.Second, func() bool {
		for _, id := range ids {
			if v := c.get(t, id); v.Status != jobs.Running || v.BatchID == "" {
				return false
			}
		}
		return true
	}, "every job running in a batch")
	first.Kill(t)
	c.start(t, "worker")
	done := c.waitAll(t, ids, time.Minute)
	batch := ""
	for id, v := range done {
		if v.Status != jobs.Succeeded || v.DispatchedVia != "batch" || v.Attempts != 1 {
			t.Fatalf("job %s: %s via %q after %d attempts; want succeeded by batch after 1", id, v.Status, v.DispatchedVia, v.Attempts)
		}
		if batch != "" && v.BatchID != batch {
			t.Fatalf("jobs in two batches: %s and %s", batch, v.BatchID)
		}
		batch = v.BatchID
		v.Token = tokens[id]
		evs := c.eventsFrom(t, c.api, v)
		if n, m := strings.Count(evs, "event: started\n"), strings.Count(evs, "event: succeeded\n"); n != 1 || m != 1 {
			t.Fatalf("job %s: %d started and %d succeeded events, want 1 each:\n%s", id, n, m, evs)
		}
	}
	if st := c.fake.Stats(); st.Batches != 1 || st.BatchRequests != 20 || st.Requests != 0 {
		t.Fatalf("upstream saw %d batches of %d requests and %d Messages calls; want 1 of 20 and none", st.Batches, st.BatchRequests, st.Requests)
	}
}
