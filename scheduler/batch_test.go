package scheduler_test

import (
	"context"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/rkeys"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/scheduler"
)

// TestBatchSteps runs every step of a group's batches through one Redis
// and through a 3-node cluster (each script in one slot): jobs admitted
// for a batch wait outside the Messages line and are never dispatched
// there before their fallback time; a take claims them, a record makes the
// claim a batch that comes due for checks with a doubling wait; a return
// puts a claim's jobs back; an adopted batch may serve several claims; a
// job that ends leaves the set the dispatch round's safety net counts.
func TestBatchSteps(t *testing.T) {
	inEachMode(t, func(t *testing.T, rdb redis.UniversalClient) {
		clk := harness.NewClock(time.Date(2026, 12, 5, 9, 0, 0, 0, time.UTC))
		store := jobs.NewStore(rdb, jobs.Options{})
		s := scheduler.New(rdb, store, scheduler.Options{Clock: clk.Now, LeaseTTL: time.Hour})
		ctx := context.Background()
		g := &config.ModelGroup{Name: "g", RPM: 1000, InputTPM: 1e6, OutputTPM: 1e6, Burst: time.Minute, MaxConcurrency: 10,
			Batch: true, BatchFallbackAfter: 10 * time.Minute}
		admit := func(user string, fallback time.Duration) *jobs.Job {
			t.Helper()
			j := &jobs.Job{ID: jobs.NewID(g.Name), Tenant: "t", UserID: user, Model: "m", Group: g.Name,
				MaxTokens: 100, Request: []byte(`{"model":"m"}`), CreatedAt: clk.Now(), Class: config.ClassBackground,
				DeadlineAt: clk.Now().Add(2 * time.Hour)}
			res, err := s.Admit(ctx, scheduler.Admission{Job: j, Group: g, InputEstimate: 100,
				Policy: config.UserPolicy{Weight: 1}, BatchFallback: fallback})
			if err != nil || res.Outcome != scheduler.Admitted || res.Batch != (fallback > 0) {
				t.Fatalf("admit: %+v, %v", res, err)
			}
			return j
		}
		var ids []string
		for i := range 4 {
			ids = append(ids, admit([]string{"a", "b"}[i%2], 10*time.Minute).ID)
		}
		// Waiting for a batch: no place in the Messages line, never
		// dispatched there.
		j0, _ := store.Get(ctx, ids[0])
		if _, _, ok, err := s.Position(ctx, j0, g); ok || err != nil {
			t.Fatalf("a job waiting for a batch has a position (%v)", err)
		}
		if r, err := s.Dispatch(ctx, g, 10); err != nil || len(r.Jobs) != 0 {
			t.Fatalf("dispatch picked %d jobs waiting for a batch (%v)", len(r.Jobs), err)
		}
		// Not before the window, unless the batch is full.
		if got, wait, err := s.TakeBatch(ctx, g.Name, 30*time.Second, 100, "c1"); err != nil || len(got) != 0 || wait != 30*time.Second {
			t.Fatalf("take before the window: %v jobs, wait %v, %v", got, wait, err)
		}
		got, _, err := s.TakeBatch(ctx, g.Name, 30*time.Second, 3, "c1")
		if err != nil || len(got) != 3 || got[0].ID != ids[0] || got[0].Dispatch != 1 {
			t.Fatalf("take of a full batch: %+v, %v", got, err)
		}
		j0, _ = store.Get(ctx, ids[0])
		if j0.Status != jobs.Running || j0.Via != "batch" || j0.BatchClaim != "c1" {
			t.Fatalf("taken job: %s via %q claim %q", j0.Status, j0.Via, j0.BatchClaim)
		}
		if ok, err := s.RecordBatch(ctx, g.Name, "c1", "msgbatch_1", 30*time.Second); err != nil || !ok {
			t.Fatalf("record: %v, %v", ok, err)
		}
		if ok, err := s.RecordBatch(ctx, g.Name, "c1", "msgbatch_9", 30*time.Second); err != nil || ok {
			t.Fatalf("record of a claim recorded already: %v, %v; want false", ok, err)
		}
		a := scheduler.Attempt{Group: g, Job: j0, Dispatch: 1}
		if n, err := s.StartBatched(ctx, a, "msgbatch_1", clk.Now()); err != nil || n != 1 {
			t.Fatalf("start: %d, %v", n, err)
		}
		if _, err := s.StartBatched(ctx, a, "msgbatch_1", clk.Now()); err != scheduler.ErrAttemptRunning {
			t.Fatalf("a second start: %v, want ErrAttemptRunning", err)
		}
		// Checks come due with a doubling wait.
		if bs, _, err := s.BatchesDue(ctx, g.Name, time.Hour, 5*time.Minute); err != nil || len(bs) != 0 {
			t.Fatalf("due at once: %+v, %v", bs, err)
		}
		clk.Advance(30 * time.Second)
		bs, _, err := s.BatchesDue(ctx, g.Name, time.Hour, 5*time.Minute)
		if err != nil || len(bs) != 1 || bs[0].ID != "msgbatch_1" || len(bs[0].Jobs) != 3 {
			t.Fatalf("due after 30s: %+v, %v", bs, err)
		}
		clk.Advance(59 * time.Second)
		if bs, _, _ := s.BatchesDue(ctx, g.Name, time.Hour, 5*time.Minute); len(bs) != 0 {
			t.Fatalf("due again before the doubled wait (60s): %+v", bs)
		}
		clk.Advance(time.Second)
		if bs, _, _ := s.BatchesDue(ctx, g.Name, time.Hour, 5*time.Minute); len(bs) != 1 {
			t.Fatal("not due after the doubled wait")
		}
		if n, err := s.BatchRunning(ctx, g.Name, "msgbatch_1"); err != nil || n != 3 {
			t.Fatalf("running: %d, %v", n, err)
		}
		if ok, _ := s.MarkBatchCanceled(ctx, g.Name, "msgbatch_1"); !ok {
			t.Fatal("first cancel mark refused")
		}
		if ok, _ := s.MarkBatchCanceled(ctx, g.Name, "msgbatch_1"); ok {
			t.Fatal("second cancel mark taken")
		}
		if err := s.Succeed(ctx, scheduler.Success{Attempt: a, Result: []byte(`{}`), At: clk.Now()}); err != nil {
			t.Fatal(err)
		}
		if n, _ := rdb.ZCard(ctx, rkeys.FQ(g.Name, "batched")).Result(); n != 2 {
			t.Fatalf("%d jobs in batches after one ended, want 2", n)
		}
		if err := s.BatchDone(ctx, g.Name, "msgbatch_1"); err != nil {
			t.Fatal(err)
		}

		// A claim never recorded: found due for a look, its jobs go
		// back to the line (and to the retry waits).
		got, _, err = s.TakeBatch(ctx, g.Name, 0, 10, "c2")
		if err != nil || len(got) != 1 || got[0].ID != ids[3] {
			t.Fatalf("second take: %+v, %v", got, err)
		}
		clk.Advance(2 * time.Minute)
		_, cs, err := s.BatchesDue(ctx, g.Name, time.Minute, 5*time.Minute)
		if err != nil || len(cs) != 1 || cs[0].ID != "c2" || len(cs[0].Jobs) != 1 {
			t.Fatalf("claims due: %+v, %v", cs, err)
		}
		// An adopted batch may serve two claims; a recorded one none.
		for _, c := range []string{"c2"} {
			if ok, err := s.AdoptBatch(ctx, g.Name, c, "msgbatch_2", time.Second); err != nil || !ok {
				t.Fatalf("adopt for %s: %v %v", c, ok, err)
			}
		}
		if known, _ := s.HasBatch(ctx, g.Name, "msgbatch_2"); !known {
			t.Fatal("adopted batch unknown")
		}
		if err := s.BatchDone(ctx, g.Name, "msgbatch_2"); err != nil {
			t.Fatal(err)
		}
		if n, err := s.ReturnBatch(ctx, g.Name, "c2"); err != nil || n != 1 {
			t.Fatalf("return: %d, %v", n, err)
		}
		j3, _ := store.Get(ctx, ids[3])
		if j3.Status != jobs.Queued || j3.Via != "" {
			t.Fatalf("returned job: %s via %q", j3.Status, j3.Via)
		}
		if n, _ := rdb.ZCard(ctx, rkeys.FQ(g.Name, "batched")).Result(); n != 2 {
			t.Fatalf("%d jobs in batches after the return, want 2 (the first batch's)", n)
		}
		// Its fallback time passed meanwhile? Not yet: still not
		// dispatched; after it, the Messages line takes it.
		if r, _ := s.Dispatch(ctx, g, 10); len(r.Jobs) != 0 {
			t.Fatalf("dispatched %d jobs before their fallback time", len(r.Jobs))
		}
		clk.Advance(10 * time.Minute)
		r, err := s.Dispatch(ctx, g, 10)
		if err != nil || len(r.Jobs) != 1 || r.Jobs[0].JobID != ids[3] {
			t.Fatalf("after the fallback time: %+v, %v", r.Jobs, err)
		}
		// The line's entry left behind is dropped by the next take.
		if got, _, err := s.TakeBatch(ctx, g.Name, 0, 10, "c3"); err != nil || len(got) != 0 {
			t.Fatalf("take after the fallback: %+v, %v", got, err)
		}
	})
}
