package scheduler_test

import (
	"context"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/hibiken/asynq"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/redistest"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/scheduler"
	"github.com/sluice-dev/sluice/tasks"
)

// recorder is an Enqueuer that remembers task ids and refuses duplicates,
// as asynq does.
type recorder struct {
	mu  sync.Mutex
	ids []string
}

func (r *recorder) EnqueueContext(ctx context.Context, t *asynq.Task, opts ...asynq.Option) (*asynq.TaskInfo, error) {
	p, err := tasks.ParseRunJob(t)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, id := range r.ids {
		if id == p.TaskID() {
			return nil, asynq.ErrTaskIDConflict
		}
	}
	r.ids = append(r.ids, p.TaskID())
	return &asynq.TaskInfo{ID: p.TaskID()}, nil
}

func (r *recorder) got() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.ids...)
}

func TestDispatcherHandsOverAJobWhoseDispatcherDied(t *testing.T) {
	r := redistest.Start(t)
	rdb := r.Client(t)
	store := jobs.NewStore(rdb, jobs.Options{})
	s := scheduler.New(rdb, store, scheduler.Options{})
	g := config.ModelGroup{Name: "g", RPM: 1000, InputTPM: 100000, OutputTPM: 100000, MaxConcurrency: 10, Burst: time.Minute}
	ctx := context.Background()
	j := &jobs.Job{ID: jobs.NewID("g"), Tenant: "t", UserID: "u", Model: "m", Group: "g", MaxTokens: 10, Request: []byte(`{}`), CreatedAt: time.Now()}
	if res, err := s.Admit(ctx, scheduler.Admission{Job: j, Group: &g, InputEstimate: 10, Policy: config.UserPolicy{Weight: 1}}); err != nil || res.Outcome != scheduler.Admitted {
		t.Fatal(err)
	}
	// A dispatcher picks the job and dies before handing it to asynq.
	if res, err := s.Dispatch(ctx, &g, 1); err != nil || len(res.Jobs) != 1 {
		t.Fatalf("%+v %v", res, err)
	}
	rec := &recorder{}
	d := scheduler.NewDispatcher(scheduler.DispatcherDeps{
		Scheduler: s, Redis: rdb, Groups: []config.ModelGroup{g}, Enqueuer: rec,
		Task: tasks.RunJobOptions{MaxRetry: 1}, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		HandOverAfter: 200 * time.Millisecond,
	})
	dctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { _ = d.Run(dctx); close(done) }()
	defer func() { cancel(); <-done }()
	harness.Eventually(t, 10*time.Second, func() bool { return len(rec.got()) == 1 }, "the hand-over")
	if got := rec.got(); got[0] != j.ID {
		t.Fatalf("handed over %v, want the job id %s", got, j.ID)
	}
	left, err := s.Unhanded(ctx, "g", 0)
	if err != nil || len(left) != 0 {
		t.Fatalf("still unhanded: %v %v", left, err)
	}
	// A new arrival is dispatched by the live dispatcher; the job is handed
	// over once only.
	j2 := &jobs.Job{ID: jobs.NewID("g"), Tenant: "t", UserID: "u", Model: "m", Group: "g", MaxTokens: 10, Request: []byte(`{}`), CreatedAt: time.Now()}
	if res, err := s.Admit(ctx, scheduler.Admission{Job: j2, Group: &g, InputEstimate: 10, Policy: config.UserPolicy{Weight: 1}}); err != nil || res.Outcome != scheduler.Admitted {
		t.Fatal(err)
	}
	harness.Eventually(t, 10*time.Second, func() bool { return len(rec.got()) == 2 }, "the new job's dispatch")
	if got := rec.got(); got[1] != j2.ID {
		t.Fatalf("tasks %v", got)
	}
}
