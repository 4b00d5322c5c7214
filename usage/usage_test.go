package usage_test

import (
	"bytes"
	"context"
	"encoding/csv"
	"errors"
	"fmt"
	"math"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/internal/redistest"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/pricing"
	"github.com/sluice-dev/sluice/scheduler"
	"github.com/sluice-dev/sluice/usage"
)

func TestQuantilesFromBuckets(t *testing.T) {
	r := redistest.Start(t)
	rdb := r.Client(t)
	now := time.Date(2026, 11, 29, 14, 30, 0, 0, time.UTC)
	rec := usage.New(rdb, usage.Retention{}, func() time.Time { return now })
	sched := scheduler.New(rdb, jobs.NewStore(rdb, jobs.Options{}), scheduler.Options{})
	ctx := context.Background()
	// 100 answers: 50 took 0.75 s (bucket 0.5–1), 45 took 1.5 s (1–2), 5 took 10 s (8–13).
	var lat []time.Duration
	for range 50 {
		lat = append(lat, 750*time.Millisecond)
	}
	for range 45 {
		lat = append(lat, 1500*time.Millisecond)
	}
	for range 5 {
		lat = append(lat, 10*time.Second)
	}
	for i, d := range lat {
		finish(t, rdb, sched, rec, &testGroup, fmt.Sprintf("job%d", i), "t1", "u", true, jobs.Usage{InputTokens: 1}, d, now)
	}
	rep, err := rec.Query(ctx, []string{"g"}, []string{"t1"}, usage.Hour, 1, 5)
	if err != nil {
		t.Fatal(err)
	}
	p := rep.Totals.Latency
	if p.P50 == nil || p.P95 == nil {
		t.Fatalf("percentiles missing: %+v", p)
	}
	// p50: rank 50 is the last of the first bucket's 50 → its upper bound 1 s.
	// p95: rank 95 is the last of the 1–2 s bucket → 2 s.
	if *p.P50 != 1 || *p.P95 != 2 {
		t.Fatalf("p50 %v p95 %v, want 1 and 2 (from the buckets)", *p.P50, *p.P95)
	}
	empty, err := rec.Query(ctx, []string{"g"}, []string{"nobody"}, usage.Hour, 1, 5)
	if err != nil {
		t.Fatal(err)
	}
	if empty.Totals.Latency.P50 != nil {
		t.Fatalf("a tenant with no answers has a p50: %v", *empty.Totals.Latency.P50)
	}
}

// finish stores a running job whose first attempt is open and ends it,
// succeeded (with one upstream call's usage) or failed, with the
// recorder's tallies, as the worker does.
func finish(t *testing.T, rdb *redis.Client, sched *scheduler.Scheduler, rec *usage.Recorder, g *config.ModelGroup, id, tenant, user string, ok bool, u jobs.Usage, latency time.Duration, at time.Time) error {
	t.Helper()
	return finishModel(t, rdb, sched, rec, g, "m", id, tenant, user, ok, u, latency, at)
}

// finishModel is finish for a job of model.
func finishModel(t *testing.T, rdb *redis.Client, sched *scheduler.Scheduler, rec *usage.Recorder, g *config.ModelGroup, model, id, tenant, user string, ok bool, u jobs.Usage, latency time.Duration, at time.Time) error {
	t.Helper()
	ctx := context.Background()
	j := &jobs.Job{ID: id, Tenant: tenant, UserID: user, Group: g.Name, Model: model, Status: jobs.Running, CreatedAt: at.Add(-latency)}
	store := jobs.NewStore(rdb, jobs.Options{})
	if err := rdb.HSet(ctx, jobs.Key(id), append(store.Fields(j), "status", "running", "dispatch", 1, "attempt_open", 1)...).Err(); err != nil {
		t.Fatal(err)
	}
	a := scheduler.Attempt{Group: g, Job: j, Dispatch: 1}
	done := rec.Tallies(usage.Finished{Group: g.Name, Tenant: tenant, UserID: user, Succeeded: ok, Latency: latency, Wait: latency / 2, At: at})
	if !ok {
		return sched.Fail(ctx, scheduler.Failure{Attempt: a, Error: jobs.Error{Type: "x", Message: "y"}, At: at, Tallies: done})
	}
	call := rec.CallTallies(usage.Call{Group: g.Name, Tenant: tenant, UserID: user, JobID: id, Model: model, Usage: u, At: at})
	return sched.Succeed(ctx, scheduler.Success{Attempt: a, Result: []byte(`{}`), Usage: u, At: at, Tallies: append(call, done...)})
}

var (
	testGroup  = config.ModelGroup{Name: "g", RPM: 1000, InputTPM: 1000000, OutputTPM: 1000000, Burst: time.Minute, MaxConcurrency: 10}
	testGroup2 = config.ModelGroup{Name: "g2", RPM: 1000, InputTPM: 1000000, OutputTPM: 1000000, Burst: time.Minute, MaxConcurrency: 10}
	// bothGroups: the statistics of a tenant are kept per group and added up.
	bothGroups = []string{"g", "g2"}
)

func TestSumsEqualTheJobs(t *testing.T) {
	r := redistest.Start(t)
	now := time.Date(2026, 11, 29, 14, 30, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	// Two workers (own Redis clients) finish jobs at once.
	rdbs := []*redis.Client{r.Client(t), r.Client(t)}
	recs := []*usage.Recorder{usage.New(rdbs[0], usage.Retention{}, clock), usage.New(rdbs[1], usage.Retention{}, clock)}
	scheds := []*scheduler.Scheduler{
		scheduler.New(rdbs[0], jobs.NewStore(rdbs[0], jobs.Options{}), scheduler.Options{}),
		scheduler.New(rdbs[1], jobs.NewStore(rdbs[1], jobs.Options{}), scheduler.Options{}),
	}
	type want struct{ requests, in, out, cr, cw, failed int64 }
	wants := map[string]*want{"alpha": {}, "beta": {}}
	userTokens := map[string]int64{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for w := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 60 {
				tenant := []string{"alpha", "beta"}[i%2]
				user := fmt.Sprintf("user%d", i%7)
				u := jobs.Usage{InputTokens: 10 + i, OutputTokens: 3 * i, CacheReadInputTokens: i % 4, CacheCreationInputTokens: i % 3}
				ok := i%5 != 0
				// An hour ago for some: they land in the previous bucket.
				at := now.Add(-time.Duration(i%2) * time.Hour)
				g := []*config.ModelGroup{&testGroup, &testGroup2}[i%3%2]
				if err := finish(t, rdbs[w], scheds[w], recs[w], g, fmt.Sprintf("w%d-%d", w, i), tenant, user, ok, u, time.Second, at); err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				wt := wants[tenant]
				if ok {
					wt.requests++
					wt.in += int64(u.InputTokens)
					wt.out += int64(u.OutputTokens)
					wt.cr += int64(u.CacheReadInputTokens)
					wt.cw += int64(u.CacheCreationInputTokens)
					if tenant == "alpha" {
						userTokens[user] += int64(u.InputTokens + u.OutputTokens + u.CacheReadInputTokens + u.CacheCreationInputTokens)
					}
				} else {
					wt.failed++
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	// A transition that loses (the job was already finished) counts nothing.
	j := &jobs.Job{ID: "w0-1", Tenant: "alpha", UserID: "user1", Group: "g"}
	err := scheds[0].Succeed(context.Background(), scheduler.Success{Attempt: scheduler.Attempt{Group: &testGroup, Job: j, Dispatch: 1},
		Result: []byte(`{}`), At: now,
		Tallies: append(recs[0].CallTallies(usage.Call{Tenant: "alpha", UserID: "user1", Usage: jobs.Usage{InputTokens: 1000}, At: now}),
			recs[0].Tallies(usage.Finished{Tenant: "alpha", UserID: "user1", Succeeded: true, Latency: time.Second, At: now})...)})
	var se *jobs.StateError
	if !errors.As(err, &se) {
		t.Fatalf("second finish of a job: %v, want a StateError", err)
	}

	rep, err := recs[0].Query(context.Background(), bothGroups, []string{"alpha", "beta"}, usage.Hour, 24, 3)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Buckets) != 24 || !rep.To.Equal(time.Date(2026, 11, 29, 15, 0, 0, 0, time.UTC)) {
		t.Fatalf("%d buckets to %v", len(rep.Buckets), rep.To)
	}
	var all want
	for _, tr := range rep.Tenants {
		w := wants[tr.Tenant]
		got := want{tr.Totals.Requests, tr.Totals.InputTokens, tr.Totals.OutputTokens, tr.Totals.CacheReadTokens, tr.Totals.CacheWriteTokens, tr.Totals.Failed}
		if got != *w {
			t.Errorf("%s: statistics %+v, jobs %+v", tr.Tenant, got, *w)
		}
		var sum int64
		for _, b := range tr.Buckets {
			sum += b.Requests
		}
		if sum != w.requests {
			t.Errorf("%s: buckets add up to %d requests, totals say %d", tr.Tenant, sum, w.requests)
		}
		all.requests += w.requests
		all.in += w.in
	}
	if rep.Totals.Requests != all.requests || rep.Totals.InputTokens != all.in {
		t.Errorf("all tenants: %d requests %d input, want %d %d", rep.Totals.Requests, rep.Totals.InputTokens, all.requests, all.in)
	}
	// Top users: alpha's three largest by tokens, largest first.
	top := rep.Tenants[0].TopUsers
	if len(top) != 3 {
		t.Fatalf("top users %+v", top)
	}
	for i, u := range top {
		if u.Tokens != userTokens[u.UserID] {
			t.Errorf("top user %s: %d tokens, jobs say %d", u.UserID, u.Tokens, userTokens[u.UserID])
		}
		if i > 0 && u.Tokens > top[i-1].Tokens {
			t.Errorf("top users out of order: %+v", top)
		}
	}
	for u, n := range userTokens {
		if n > top[2].Tokens && u != top[0].UserID && u != top[1].UserID && u != top[2].UserID {
			t.Errorf("user %s has %d tokens, more than listed %+v", u, n, top)
		}
	}
	tot := rep.Totals
	wantAvg := float64(tot.InputTokens+tot.OutputTokens+tot.CacheReadTokens+tot.CacheWriteTokens) / float64(tot.Requests)
	if math.Abs(tot.AvgTokensPerRequest-wantAvg) > 0.05 {
		t.Errorf("average %v, want %v", tot.AvgTokensPerRequest, wantAvg)
	}

	// Daily buckets hold the same.
	day, err := recs[1].Query(context.Background(), bothGroups, []string{"alpha", "beta"}, usage.Day, 2, 3)
	if err != nil {
		t.Fatal(err)
	}
	if day.Totals.Requests != rep.Totals.Requests || day.Totals.OutputTokens != rep.Totals.OutputTokens {
		t.Errorf("days: %d requests %d output; hours: %d %d", day.Totals.Requests, day.Totals.OutputTokens, rep.Totals.Requests, rep.Totals.OutputTokens)
	}

	// CSV: a header and one row per tenant per hour, adding up the same.
	var buf bytes.Buffer
	if err := usage.WriteCSV(&buf, rep); err != nil {
		t.Fatal(err)
	}
	rows, err := csv.NewReader(&buf).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 1+24*2 || rows[0][2] != "requests" {
		t.Fatalf("%d CSV rows, header %v", len(rows), rows[0])
	}
	var csvRequests int64
	for _, row := range rows[1:] {
		var n int64
		fmt.Sscan(row[2], &n)
		csvRequests += n
	}
	if csvRequests != rep.Totals.Requests {
		t.Errorf("CSV adds up to %d requests, report %d", csvRequests, rep.Totals.Requests)
	}
}

func TestRefusalsAndRetention(t *testing.T) {
	r := redistest.Start(t)
	rdb := r.Client(t)
	now := time.Date(2026, 11, 29, 14, 30, 0, 0, time.UTC)
	rec := usage.New(rdb, usage.Retention{Hourly: 48 * time.Hour, Daily: 30 * 24 * time.Hour}, func() time.Time { return now })
	ctx := context.Background()
	for _, reason := range []string{usage.RefusedUserQuota, usage.RefusedUserQuota, usage.RefusedQueueLimit, usage.RefusedOverloaded} {
		if err := rec.Refused(ctx, "", "alpha", reason); err != nil {
			t.Fatal(err)
		}
	}
	for _, st := range []int{429, 429, 529, 500} {
		if err := rec.Upstream(ctx, "g", "alpha", st); err != nil {
			t.Fatal(err)
		}
	}
	rep, err := rec.Query(ctx, bothGroups, []string{"alpha"}, usage.Hour, 2, 5)
	if err != nil {
		t.Fatal(err)
	}
	got := rep.Tenants[0].Totals
	if got.Refused != (usage.Refusals{UserQuota: 2, QueueLimit: 1, Overloaded: 1}) || got.Upstream429 != 2 || got.Upstream529 != 1 {
		t.Fatalf("refused %+v, 429 %d, 529 %d", got.Refused, got.Upstream429, got.Upstream529)
	}
	ttl := rdb.TTL(ctx, "sluice:usage:alpha:h:2026112914").Val()
	if ttl <= 48*time.Hour || ttl > 49*time.Hour {
		t.Errorf("hourly bucket TTL %v, want the 48 h retention plus an hour", ttl)
	}
	ttl = rdb.TTL(ctx, "sluice:usage:alpha:d:20261129").Val()
	if ttl <= 30*24*time.Hour || ttl > 31*24*time.Hour {
		t.Errorf("daily bucket TTL %v, want the 30 d retention plus a day", ttl)
	}
}

// Every call is costed at its model's price: the job's record, the
// tenant's buckets and its users add up the same µ$; a model the price
// list lacks is counted, not costed.
func TestCostInDollars(t *testing.T) {
	r := redistest.Start(t)
	rdb := r.Client(t)
	now := time.Date(2026, 11, 29, 14, 30, 0, 0, time.UTC)
	prices := pricing.NewTable([]pricing.Entry{{Models: []string{"claude-sonnet-*"}, Price: pricing.Price{
		Input: 3, Output: 15, CacheWrite5m: 3.75, CacheWrite1h: 6, CacheRead: 0.3}}}, false)
	rec := usage.New(rdb, usage.Retention{}, func() time.Time { return now }).WithPrices(prices)
	store := jobs.NewStore(rdb, jobs.Options{})
	sched := scheduler.New(rdb, store, scheduler.Options{})
	ctx := context.Background()
	id1, id2, id3 := jobs.NewID("g"), jobs.NewID("g"), jobs.NewID("g")
	// 1,000 in, 500 out: 3,000 + 7,500 µ$.
	if err := finishModel(t, rdb, sched, rec, &testGroup, "claude-sonnet-4-6", id1, "t1", "ann", true,
		jobs.Usage{InputTokens: 1000, OutputTokens: 500}, time.Second, now); err != nil {
		t.Fatal(err)
	}
	// 6,000 written (2,000 of them for an hour), 100 in, 10 out:
	// 4,000 × 3.75 + 2,000 × 6 + 300 + 150 µ$.
	u := jobs.Usage{InputTokens: 100, OutputTokens: 10, CacheCreationInputTokens: 6000}
	u.CacheCreation = &struct {
		Ephemeral5m int `json:"ephemeral_5m_input_tokens"`
		Ephemeral1h int `json:"ephemeral_1h_input_tokens"`
	}{4000, 2000}
	if err := finishModel(t, rdb, sched, rec, &testGroup, "claude-sonnet-4-6", id2, "t1", "bob", true, u, time.Second, now); err != nil {
		t.Fatal(err)
	}
	if err := finishModel(t, rdb, sched, rec, &testGroup, "gpt-9", id3, "t1", "bob", true,
		jobs.Usage{InputTokens: 10, OutputTokens: 10}, time.Second, now); err != nil {
		t.Fatal(err)
	}
	for id, want := range map[string]float64{id1: 0.0105, id2: 0.02745} {
		j, err := store.Get(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if v := j.View(); v.CostUSD == nil || *v.CostUSD != want {
			t.Errorf("job %s cost %v, want $%v", id, v.CostUSD, want)
		}
	}
	if j, _ := store.Get(ctx, id3); j.View().CostUSD != nil {
		t.Errorf("an unpriced model's job has a cost: %v", *j.View().CostUSD)
	}
	rep, err := rec.Query(ctx, []string{"g"}, []string{"t1"}, usage.Hour, 1, 5)
	if err != nil {
		t.Fatal(err)
	}
	if got := rep.Totals.CostUSD; got != 0.03795 || rep.Totals.UnpricedCalls != 1 {
		t.Errorf("totals: $%v with %d unpriced calls, want $0.03795 and 1", got, rep.Totals.UnpricedCalls)
	}
	costs := map[string]float64{}
	for _, u := range rep.Tenants[0].TopUsers {
		costs[u.UserID] = u.CostUSD
	}
	if costs["ann"] != 0.0105 || costs["bob"] != 0.02745 {
		t.Errorf("users' costs: %v", costs)
	}
	var b bytes.Buffer
	if err := usage.WriteCSV(&b, rep); err != nil {
		t.Fatal(err)
	}
	rows, _ := csv.NewReader(&b).ReadAll()
	col := -1
	for i, h := range rows[0] {
		if h == "cost_usd" {
			col = i
		}
	}
	if col < 0 || rows[1][col] != "0.037950" {
		t.Errorf("CSV cost column %d: %v", col, rows)
	}
}
