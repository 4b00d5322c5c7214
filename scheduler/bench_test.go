package scheduler_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/internal/redistest"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/scheduler"
	"github.com/sluice-dev/sluice/tasks"
)

// fill admits n jobs spread over users, 8 at a time, and returns their ids.
func fill(b *testing.B, s *scheduler.Scheduler, g *config.ModelGroup, n, users int) []*jobs.Job {
	b.Helper()
	out := make([]*jobs.Job, n)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += 8 {
				j := &jobs.Job{ID: jobs.NewID(g.Name), Tenant: "t", UserID: fmt.Sprint("user-", i%users), Model: "m",
					Group: g.Name, Status: jobs.Queued, MaxTokens: 100, Request: []byte(`{}`), CreatedAt: time.Now()}
				if res, err := s.Admit(context.Background(), scheduler.Admission{Job: j, Group: g, InputEstimate: 200, Policy: config.UserPolicy{Weight: 1}}); err != nil || res.Outcome != scheduler.Admitted {
					errs <- err
					return
				}
				out[i] = j
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		b.Fatal(err)
	}
	return out
}

// queued100k is a scheduler with 100,000 jobs queued over 10,000 users in a
// group whose limits never bind.
func queued100k(b *testing.B) (*scheduler.Scheduler, *config.ModelGroup, *redis.Client, []*jobs.Job) {
	r := redistest.Start(b)
	rdb := r.Client(b)
	s := scheduler.New(rdb, jobs.NewStore(rdb, jobs.Options{}), scheduler.Options{LeaseTTL: time.Hour})
	g := wideOpen()
	return s, g, rdb, fill(b, s, g, 100_000, 10_000)
}

func wideOpen() *config.ModelGroup {
	return &config.ModelGroup{Name: "g", RPM: 1e9, InputTPM: 1e12, OutputTPM: 1e12, MaxConcurrency: 1e9, Burst: time.Minute}
}

// BenchmarkDispatch100kQueued: 100,000 queued jobs over 10,000 users; the
// limiter wide open; each op is one dispatch round of up to 32 jobs (the
// dispatcher's batch). Reports jobs dispatched per second.
//
//	go test -run '^$' -bench 'Dispatch100k|Position100k' -benchtime 50x ./scheduler/
func BenchmarkDispatch100kQueued(b *testing.B) {
	s, g, _, _ := queued100k(b)
	ctx := context.Background()
	b.ResetTimer()
	start := time.Now()
	n := 0
	for i := 0; i < b.N; i++ {
		res, err := s.Dispatch(ctx, g, 32)
		if err != nil {
			b.Fatal(err)
		}
		n += len(res.Jobs)
	}
	b.ReportMetric(float64(n)/time.Since(start).Seconds(), "jobs/s")
}

// BenchmarkDispatchAndEnqueue100kQueued is the dispatcher's whole path: a
// round of 32 and each picked job handed to asynq.
func BenchmarkDispatchAndEnqueue100kQueued(b *testing.B) {
	s, g, rdb, _ := queued100k(b)
	aq := asynq.NewClientFromRedisClient(rdb)
	ctx := context.Background()
	b.ResetTimer()
	start := time.Now()
	n := 0
	for i := 0; i < b.N; i++ {
		res, err := s.Dispatch(ctx, g, 32)
		if err != nil {
			b.Fatal(err)
		}
		for _, p := range res.Jobs {
			t, _ := tasks.NewRunJob(tasks.RunJob{JobID: p.JobID, Group: g.Name, Dispatch: p.Dispatch}, tasks.RunJobOptions{MaxRetry: 3})
			if _, err := aq.EnqueueContext(ctx, t); err != nil {
				b.Fatal(err)
			}
			if err := s.Handed(ctx, g.Name, p); err != nil {
				b.Fatal(err)
			}
		}
		n += len(res.Jobs)
	}
	b.ReportMetric(float64(n)/time.Since(start).Seconds(), "jobs/s")
}

// BenchmarkPosition100kQueued: a queued job's position and eta among
// 100,000 jobs over 10,000 users (one Redis round trip).
func BenchmarkPosition100kQueued(b *testing.B) {
	s, g, rdb, js := queued100k(b)
	ctx := context.Background()
	members := make([]*jobs.Job, 0, 1000)
	store := jobs.NewStore(rdb, jobs.Options{})
	for i := 0; i < 1000; i++ {
		j, err := store.Get(ctx, js[i*97].ID)
		if err != nil {
			b.Fatal(err)
		}
		members = append(members, j)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, _, ok, err := s.Position(ctx, members[i%len(members)], g); err != nil || !ok {
			b.Fatal(ok, err)
		}
	}
}

// BenchmarkPlaces10k: 10,000 followed jobs queued (one per user); each op
// dispatches the head job, so every other job moved, and reads the 10,000
// places (one pipelined round, as an api process does after a dispatch).
// Reports the round's time.
//
//	go test -run '^$' -bench Places10k -benchtime 20x ./scheduler/
func BenchmarkPlaces10k(b *testing.B) {
	r := redistest.Start(b)
	rdb := r.Client(b)
	s := scheduler.New(rdb, jobs.NewStore(rdb, jobs.Options{}), scheduler.Options{LeaseTTL: time.Hour})
	g := wideOpen()
	js := fill(b, s, g, 10_000, 10_000)
	ctx := context.Background()
	store := jobs.NewStore(rdb, jobs.Options{})
	ws := make([]scheduler.Watched, len(js))
	for i, j := range js {
		rec, err := store.Get(ctx, j.ID)
		if err != nil {
			b.Fatal(err)
		}
		ws[i] = scheduler.Watched{ID: j.ID, Member: rec.FQMember, Group: g}
	}
	var total time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		if _, err := s.Dispatch(ctx, g, 1); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		start := time.Now()
		places, err := s.Places(ctx, ws)
		if err != nil {
			b.Fatal(err)
		}
		total += time.Since(start)
		waiting := 0
		for _, p := range places {
			if p.Position > 0 {
				waiting++
			}
		}
		if waiting != len(ws)-i-1 {
			b.Fatalf("%d jobs waiting after %d dispatches", waiting, i+1)
		}
	}
	b.ReportMetric(float64(total.Microseconds())/1000/float64(b.N), "ms/round")
}

// BenchmarkAdmitScript is the Redis time of one admission, from Redis's own
// INFO commandstats (every script an admission runs, the commands they
// call included), admissions made one at a time so that no client
// concurrency inflates it: the cost the one-core ceiling of a model group
// follows from. A job of 20 input and 1,024 output tokens from one of 64
// users, with a deadline; "quotas" is a user with hourly quotas (on one
// Redis the admission script charges them itself). Noise only adds time:
// read the lowest of several runs.
//
//	go test -run '^$' -bench AdmitScript -benchtime 10000x -count 5 ./scheduler/
func BenchmarkAdmitScript(b *testing.B) {
	for _, quotas := range []bool{false, true} {
		for _, clients := range []int{1, 32} {
			name := "no-quotas"
			policy := config.UserPolicy{Weight: 1}
			if quotas {
				name = "quotas"
				policy.RequestsPerHour, policy.TokensPerHour = 100_000_000, 1_000_000_000_000
			}
			b.Run(fmt.Sprintf("%s/clients=%d", name, clients), func(b *testing.B) {
				benchAdmitScript(b, policy, clients)
			})
		}
	}
}

// benchAdmitScript admits b.N jobs from clients goroutines (64 users)
// and reports Redis's time per admission and the script calls it took:
// admissions that wait while their group's calls run go together.
func benchAdmitScript(b *testing.B, policy config.UserPolicy, clients int) {
	rdb := redistest.Start(b).Client(b)
	s := scheduler.New(rdb, jobs.NewStore(rdb, jobs.Options{}), scheduler.Options{LeaseTTL: time.Hour})
	g := &config.ModelGroup{Name: "g", RPM: 1000, InputTPM: 1e6, OutputTPM: 1e6, MaxConcurrency: 100, Burst: time.Minute}
	ctx := context.Background()
	req := []byte(`{"model":"claude-sonnet-4-6","max_tokens":1024,"messages":[{"role":"user","content":"Hello, how do token buckets work?"}]}`)
	admit := func(i int) {
		now := time.Now()
		j := &jobs.Job{ID: jobs.NewID(g.Name), Tenant: "t", UserID: fmt.Sprint("user-", i%64), Model: "claude-sonnet-4-6",
			Group: g.Name, MaxTokens: 1024, Request: req, CreatedAt: now, DeadlineAt: now.Add(time.Hour), TokenHash: "0123456789abcdef"}
		if res, err := s.Admit(ctx, scheduler.Admission{Job: j, Group: g, InputEstimate: 20, Policy: policy}); err != nil || res.Outcome != scheduler.Admitted {
			b.Error(res, err)
		}
	}
	for i := range 500 { // warm: scripts loaded, structures grown
		admit(i)
	}
	if err := rdb.ConfigResetStat(ctx).Err(); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	var wg sync.WaitGroup
	for c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := c; i < b.N; i += clients {
				admit(i)
			}
		}()
	}
	wg.Wait()
	b.StopTimer()
	usec, calls := redistest.ScriptTime(b, rdb)
	b.ReportMetric(usec/float64(b.N), "redis-µs/admission")
	b.ReportMetric(float64(calls)/float64(b.N), "scripts/admission")
}
