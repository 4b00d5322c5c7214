package worker_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/rkeys"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/upstream"
	"github.com/sluice-dev/sluice/worker"
)

// batchGroup turns batches on for the harness's group, with short waits.
const batchGroup = "    batch: true\n    batch_window: 300ms\n    batch_poll: 100ms\n    batch_fallback_after: 30s\n"

// batchJob is a background job that can wait an hour and more: it goes by
// batch when its group allows.
func batchJob(user, text string) map[string]any {
	b := harness.JobBody(user, text)
	b["class"] = "background"
	b["deadline_seconds"] = 7200
	return b
}

func startBatchEnv(t *testing.T, groupExtra string, delay time.Duration, noWorker bool) *harness.Env {
	t.Helper()
	return harness.Start(t, harness.Options{GroupExtra: groupExtra, NoWorker: noWorker,
		Fake: fakeanthropic.Config{BatchDelay: delay}})
}

// TestBatchOffload: background jobs that can wait go upstream in one or a
// few Message Batches, not by the Messages API; each ends with the same
// result shape as a Messages answer, says it went by batch, and costs half.
func TestBatchOffload(t *testing.T) {
	// The batch goes when the 50th job waits (or, on a slow machine, after
	// a window of 5 s).
	e := startBatchEnv(t, "    batch: true\n    batch_window: 5s\n    batch_max_jobs: 50\n    batch_poll: 100ms\n    batch_fallback_after: 30s\n",
		500*time.Millisecond, false)
	var ids []string
	for i := range 50 {
		v := e.Submit(t, batchJob(fmt.Sprintf("student-%d", i%5), fmt.Sprintf("essay %d", i)))
		if v.Position != nil || v.ETASeconds != nil || v.WaitReason != "batch" {
			t.Fatalf("a job waiting for a batch shows position %v eta %v reason %q; want none, none, \"batch\"", v.Position, v.ETASeconds, v.WaitReason)
		}
		ids = append(ids, v.ID)
	}
	harness.Eventually(t, 10*time.Second, func() bool {
		n, ok := harness.Metric(metricsPage(t, e), `sluice_batch_jobs{group="sonnet",state="in_batch"}`)
		return ok && n > 0
	}, "the metrics to show jobs in a batch")
	batches := map[string]int{}
	for _, id := range ids {
		v := e.WaitTerminal(t, id, 30*time.Second)
		if v.Status != jobs.Succeeded || v.DispatchedVia != "batch" || v.BatchID == "" {
			t.Fatalf("job %s: status %s via %q batch %q; want succeeded by batch", id, v.Status, v.DispatchedVia, v.BatchID)
		}
		if v.Text == nil || *v.Text == "" || v.Usage == nil || v.Usage.OutputTokens == 0 || len(v.Result) == 0 {
			t.Fatalf("job %s: no text, usage or result: %+v", id, v)
		}
		var m struct {
			Type    string `json:"type"`
			Content []struct {
				Text string `json:"text"`
			} `json:"content"`
		}
		if err := json.Unmarshal(v.Result, &m); err != nil || m.Type != "message" || len(m.Content) == 0 || m.Content[0].Text != *v.Text {
			t.Fatalf("job %s: result is not the Message of its text: %s (%v)", id, v.Result, err)
		}
		batches[v.BatchID]++
	}
	if n, _ := harness.Metric(metricsPage(t, e), `sluice_batch_jobs{group="sonnet",state="in_batch"}`); n != 0 {
		t.Fatalf("%v jobs still in batches after all ended", n)
	}
	st := e.Fake.Stats()
	if st.Requests != 0 || st.BatchRequests != 50 || st.Batches != int64(len(batches)) || st.Batches > 3 {
		t.Fatalf("upstream saw %d Messages calls, %d batches of %d requests (jobs name %d batches); want 0 calls, 50 requests in at most 3 batches",
			st.Requests, st.Batches, st.BatchRequests, len(batches))
	}

	// The same job sent interactively costs twice as much.
	batched := e.Get(t, ids[0])
	v := e.WaitTerminal(t, e.Submit(t, harness.JobBody("student-0", "essay 0")).ID, 30*time.Second)
	if v.DispatchedVia != "messages" || v.CostUSD == nil || batched.CostUSD == nil {
		t.Fatalf("interactive job via %q cost %v, batched cost %v", v.DispatchedVia, v.CostUSD, batched.CostUSD)
	}
	if ratio := *batched.CostUSD / *v.CostUSD; ratio < 0.49 || ratio > 0.51 {
		t.Fatalf("a batched job cost %v, the same job interactive %v: ratio %.3f, want 0.5", *batched.CostUSD, *v.CostUSD, ratio)
	}

	// Its event stream says how it went.
	evs := e.Events(t, context.Background(), ids[0], harness.TenantKey, "")
	var started bool
	for _, ev := range evs {
		if ev.Event == "started" {
			var d struct {
				V string `json:"dispatched_via"`
				B string `json:"batch_id"`
			}
			_ = json.Unmarshal([]byte(ev.Data), &d)
			started = d.V == "batch" && d.B == batched.BatchID
		}
	}
	if !started {
		t.Fatalf("no started event naming the batch: %+v", evs)
	}
}

// TestBatchIneligibleJobsUseMessages: interactive jobs, background jobs
// with a deadline under the slack, and groups without batch go by the
// Messages API.
func TestBatchIneligibleJobsUseMessages(t *testing.T) {
	e := startBatchEnv(t, batchGroup, 0, false)
	short := batchJob("u", "short deadline")
	short["deadline_seconds"] = 600
	for _, b := range []map[string]any{harness.JobBody("u", "interactive"), short} {
		v := e.WaitTerminal(t, e.Submit(t, b).ID, 30*time.Second)
		if v.Status != jobs.Succeeded || v.DispatchedVia != "messages" {
			t.Fatalf("job %s: %s via %q; want succeeded by messages", v.ID, v.Status, v.DispatchedVia)
		}
	}
	if st := e.Fake.Stats(); st.Batches != 0 || st.Requests != 2 {
		t.Fatalf("upstream saw %d batches and %d Messages calls; want 0 and 2", st.Batches, st.Requests)
	}
}

// TestBatchCancel: a job canceled while its batch runs ends canceled (its
// result, when it comes, is not kept); a batch whose jobs were all
// canceled is canceled upstream.
func TestBatchCancel(t *testing.T) {
	e := startBatchEnv(t, "    batch: true\n    batch_window: 2s\n    batch_poll: 100ms\n    batch_fallback_after: 30s\n", 3*time.Second, false)
	a := e.Submit(t, batchJob("u1", "one"))
	b := e.Submit(t, batchJob("u2", "two"))
	c := e.Submit(t, batchJob("u3", "three"))
	// A job still waiting for its batch is canceled at once.
	if resp, body := e.Do(t, http.MethodDelete, "/v1/jobs/"+c.ID, harness.TenantKey, nil); resp.StatusCode != http.StatusOK {
		t.Fatalf("cancel a waiting job: %d %s", resp.StatusCode, body)
	}
	var batchID string
	harness.Eventually(t, 10*time.Second, func() bool {
		va, vb := e.Get(t, a.ID), e.Get(t, b.ID)
		batchID = va.BatchID
		return va.Status == jobs.Running && vb.Status == jobs.Running && va.BatchID != "" && va.BatchID == vb.BatchID
	}, "both jobs running in one batch")
	for _, id := range []string{a.ID, b.ID} {
		if resp, body := e.Do(t, http.MethodDelete, "/v1/jobs/"+id, harness.TenantKey, nil); resp.StatusCode != http.StatusOK {
			t.Fatalf("cancel %s: %d %s", id, resp.StatusCode, body)
		}
	}
	up := upstream.New(upstream.Options{BaseURL: e.Config.Upstream.BaseURL, APIKey: harness.UpstreamKey})
	defer up.Close()
	harness.Eventually(t, 10*time.Second, func() bool {
		bt, err := up.GetBatch(context.Background(), batchID)
		return err == nil && bt.Ended() && bt.Counts.Canceled == 2
	}, "the batch canceled upstream")
	if st := e.Fake.Stats(); st.BatchRequests != 2 || st.Requests != 0 {
		t.Fatalf("upstream saw %d batch requests and %d Messages calls; want 2 and 0 (the job canceled while waiting never went)", st.BatchRequests, st.Requests)
	}
	for _, id := range []string{a.ID, b.ID, c.ID} {
		if v := e.Get(t, id); v.Status != jobs.Canceled {
			t.Fatalf("job %s: %s, want canceled", id, v.Status)
		}
	}
	// Every reservation is back: nothing counts as queued or running.
	harness.Eventually(t, 10*time.Second, func() bool {
		n, _ := e.RDB.ZCard(context.Background(), rkeys.FQ("sonnet", "batched")).Result()
		return n == 0
	}, "no job left in a batch")
}

// TestBatchAPIFailing: while the Batches API fails, jobs bound for a batch
// wait and are tried again; one still without a batch at its fallback
// time goes by the Messages API. Once the API is back, batches go again.
func TestBatchAPIFailing(t *testing.T) {
	e := startBatchEnv(t, "    batch: true\n    batch_window: 200ms\n    batch_poll: 100ms\n    batch_fallback_after: 2s\n", 0, false)
	e.Fake.SetBatchOutage(529)
	var ids []string
	for i := range 3 {
		ids = append(ids, e.Submit(t, batchJob(fmt.Sprintf("u%d", i), "wait for me")).ID)
	}
	for _, id := range ids {
		v := e.WaitTerminal(t, id, 30*time.Second)
		if v.Status != jobs.Succeeded || v.DispatchedVia != "messages" {
			t.Fatalf("job %s: %s via %q; want succeeded by messages after its fallback time", id, v.Status, v.DispatchedVia)
		}
		if wait := v.StartedAt.Sub(v.CreatedAt); wait < 2*time.Second {
			t.Fatalf("job %s went by messages after %v, before its fallback time (2s)", id, wait)
		}
	}
	if st := e.Fake.Stats(); st.Batches != 0 || st.Requests != 3 {
		t.Fatalf("upstream saw %d batches and %d Messages calls; want 0 and 3", st.Batches, st.Requests)
	}
	page := metricsPage(t, e)
	if n, _ := harness.Metric(page, `sluice_batch_jobs_total{event="create_failed",group="sonnet"}`); n < 3 {
		t.Fatalf("sluice_batch_jobs_total create_failed = %v, want at least 3 (every try counts its jobs)", n)
	}
	e.Fake.SetBatchOutage(0)
	v := e.WaitTerminal(t, e.Submit(t, batchJob("u9", "the API is back")).ID, 30*time.Second)
	if v.Status != jobs.Succeeded || v.DispatchedVia != "batch" {
		t.Fatalf("after the outage: %s via %q; want succeeded by batch", v.Status, v.DispatchedVia)
	}
}

// TestBatchQueueCap: the Batches API refuses a batch that would pass its
// processing-queue cap (429); the jobs wait and go in a later batch, once
// the earlier one ended, still by batch.
func TestBatchQueueCap(t *testing.T) {
	e := harness.Start(t, harness.Options{
		GroupExtra: "    batch: true\n    batch_window: 2s\n    batch_max_jobs: 5\n    batch_poll: 100ms\n    batch_fallback_after: 30s\n",
		Fake:       fakeanthropic.Config{BatchDelay: 4 * time.Second, BatchQueueLimit: 5}})
	var ids []string
	for i := range 8 {
		ids = append(ids, e.Submit(t, batchJob(fmt.Sprintf("u%d", i), "queue cap")).ID)
	}
	batches := map[string]int{}
	for _, id := range ids {
		v := e.WaitTerminal(t, id, 30*time.Second)
		if v.Status != jobs.Succeeded || v.DispatchedVia != "batch" {
			t.Fatalf("job %s: %s via %q; want succeeded by batch", id, v.Status, v.DispatchedVia)
		}
		batches[v.BatchID]++
	}
	if st := e.Fake.Stats(); len(batches) != 2 || st.Batches != 2 || st.BatchRequests != 8 || st.Requests != 0 {
		t.Fatalf("jobs in %v; upstream saw %d batches of %d requests and %d Messages calls; want 2 batches (5 and 3), 0 calls",
			batches, st.Batches, st.BatchRequests, st.Requests)
	}
	if n, _ := harness.Metric(metricsPage(t, e), `sluice_batch_jobs_total{event="create_failed",group="sonnet"}`); n < 3 {
		t.Fatalf("create_failed = %v: the second batch was never refused for the queue cap", n)
	}
}

func metricsPage(t *testing.T, e *harness.Env) string {
	t.Helper()
	_, b := e.Do(t, http.MethodGet, "/metrics", harness.AdminKey, nil)
	return string(b)
}

// TestBatchWorkerRestart: a batch sent by a worker that stops before it
// ended is collected by another worker, once.
func TestBatchWorkerRestart(t *testing.T) {
	e := startBatchEnv(t, "    batch: true\n    batch_window: 5s\n    batch_max_jobs: 10\n    batch_poll: 100ms\n    batch_fallback_after: 30s\n",
		2*time.Second, false)
	var ids []string
	for i := range 10 {
		ids = append(ids, e.Submit(t, batchJob(fmt.Sprintf("u%d", i), "restart")).ID)
	}
	harness.Eventually(t, 10*time.Second, func() bool { return e.Get(t, ids[9]).BatchID != "" }, "the batch sent")
	e.Worker.Shutdown()
	harness.StartWorker(t, e)
	for _, id := range ids {
		if v := e.WaitTerminal(t, id, 30*time.Second); v.Status != jobs.Succeeded || v.Attempts != 1 {
			t.Fatalf("job %s: %s after %d attempts; want succeeded after 1", id, v.Status, v.Attempts)
		}
	}
	if st := e.Fake.Stats(); st.Batches != 1 || st.BatchRequests != 10 || st.Requests != 0 {
		t.Fatalf("upstream saw %d batches of %d requests and %d Messages calls; want 1 of 10 and 0", st.Batches, st.BatchRequests, st.Requests)
	}
}

// TestBatchLostClaimRecovered: a worker that died between creating a
// batch and recording it leaves a claim; another finds the batch upstream
// and finishes the jobs from it, without creating a second one. A claim
// whose batch was never created puts its jobs back in line.
func TestBatchLostClaimRecovered(t *testing.T) {
	defer worker.SetBatchClaimCheck(500 * time.Millisecond)()
	e := startBatchEnv(t, batchGroup, 500*time.Millisecond, true)
	ctx := context.Background()
	var ids []string
	for i := range 4 {
		ids = append(ids, e.Submit(t, batchJob(fmt.Sprintf("u%d", i), "lost")).ID)
	}
	// A dead worker's claim with its batch created upstream...
	var taken []string
	harness.Eventually(t, 5*time.Second, func() bool {
		got, _, err := e.Sched.TakeBatch(ctx, "sonnet", 300*time.Millisecond, 2, "cl_dead1")
		for _, j := range got {
			taken = append(taken, j.ID)
		}
		return err == nil && len(got) > 0
	}, "a take")
	up := upstream.New(upstream.Options{BaseURL: e.Config.Upstream.BaseURL, APIKey: harness.UpstreamKey})
	defer up.Close()
	var reqs []upstream.BatchRequest
	for _, id := range taken {
		j, err := e.Store.Get(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		reqs = append(reqs, upstream.BatchRequest{CustomID: id, Body: j.Request})
	}
	if _, err := up.CreateBatch(ctx, reqs); err != nil {
		t.Fatal(err)
	}
	// ... and one whose creation never happened.
	if got, _, err := e.Sched.TakeBatch(ctx, "sonnet", 0, 2, "cl_dead2"); err != nil || len(got) != 2 {
		t.Fatalf("second take: %d jobs, %v", len(got), err)
	}
	harness.StartWorker(t, e)
	via := map[string]string{}
	for _, id := range ids {
		v := e.WaitTerminal(t, id, 30*time.Second)
		if v.Status != jobs.Succeeded || v.DispatchedVia != "batch" {
			t.Fatalf("job %s: %s via %q; want succeeded by batch", id, v.Status, v.DispatchedVia)
		}
		via[id] = v.BatchID
	}
	if st := e.Fake.Stats(); st.Batches != 2 || st.BatchRequests != 4 || st.Requests != 0 {
		t.Fatalf("upstream saw %d batches of %d requests, %d Messages calls; want 2 of 4 (the lost one adopted, one new for the unsent claim), 0", st.Batches, st.BatchRequests, st.Requests)
	}
	if via[taken[0]] == via[ids[3]] && taken[0] != ids[3] && !contains(taken, ids[3]) {
		t.Fatalf("the unsent claim's jobs were not sent in a batch of their own: %v", via)
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
