package scheduler_test

import (
	"context"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/redistest"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/scheduler"
)

// TestQuotaSpansGroups: a user's hourly quotas are one set of buckets for
// every model group (they live in the user's slot, each group's engine in
// its own), charged before admission, given back when admission refuses,
// and given back once — what the job did not use — when it ends.
func TestQuotaSpansGroups(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	clk := harness.NewClock(time.Date(2026, 11, 29, 14, 0, 0, 0, time.UTC))
	s := scheduler.New(rdb, jobs.NewStore(rdb, jobs.Options{}), scheduler.Options{Clock: clk.Now, LeaseTTL: time.Hour})
	ctx := context.Background()
	g1 := &config.ModelGroup{Name: "one", RPM: 1000, InputTPM: 1e6, OutputTPM: 1e6, Burst: time.Minute, MaxConcurrency: 10}
	g2 := &config.ModelGroup{Name: "two", RPM: 1000, InputTPM: 1e6, OutputTPM: 1e6, Burst: time.Minute, MaxConcurrency: 10}
	policy := config.UserPolicy{Weight: 1, RequestsPerHour: 3, TokensPerHour: 1000, MaxQueued: 2}
	admit := func(g *config.ModelGroup, in, out int) (*jobs.Job, scheduler.AdmitResult) {
		t.Helper()
		j := &jobs.Job{ID: jobs.NewID(g.Name), Tenant: "t", UserID: "u", Model: "m", Group: g.Name,
			MaxTokens: out, Request: []byte(`{}`), CreatedAt: clk.Now()}
		res, err := s.Admit(ctx, scheduler.Admission{Job: j, Group: g, InputEstimate: in, Policy: policy})
		if err != nil {
			t.Fatal(err)
		}
		return j, res
	}
	quotas := func() (int, int) {
		t.Helper()
		r, tk, err := s.Quotas(ctx, "t", "u", policy)
		if err != nil {
			t.Fatal(err)
		}
		return r.Remaining, tk.Remaining
	}

	a, res := admit(g1, 100, 100)
	if res.Outcome != scheduler.Admitted || res.QuotaRemaining != 2 {
		t.Fatalf("first job: %+v", res)
	}
	admit(g1, 100, 100)
	// The group's queue cap refuses the third job in group one: its charge
	// is given back.
	if _, res := admit(g1, 100, 100); res.Outcome != scheduler.QueueLimit {
		t.Fatalf("third job in one group: %+v, want queue_limit", res)
	}
	if r, tk := quotas(); r != 1 || tk != 600 {
		t.Fatalf("after a refusal: %d requests and %d tokens left, want 1 and 600", r, tk)
	}
	if _, res := admit(g2, 100, 100); res.Outcome != scheduler.Admitted {
		t.Fatalf("a job in the other group: %+v", res)
	}
	// Three requests in two groups: the hourly quota of 3 is spent.
	if _, res := admit(g2, 10, 10); res.Outcome != scheduler.OverQuota || res.QuotaWhich != "requests" {
		t.Fatalf("a fourth request: %+v, want over quota (requests)", res)
	}
	// A job canceled while it waits used nothing: all of its hold comes back, once.
	for range 2 {
		_, _ = s.Cancel(ctx, g1, a, clk.Now(), policy) // the second finds it canceled
	}
	if r, tk := quotas(); r != 1 || tk != 600 {
		t.Fatalf("after a cancel: %d requests and %d tokens left, want 1 and 600", r, tk)
	}
	// Token quota across groups: 600 tokens left, a job of 601 does not fit.
	if _, res := admit(g1, 300, 301); res.Outcome != scheduler.OverQuota || res.QuotaWhich != "tokens" {
		t.Fatalf("a job over the token quota: %+v", res)
	}
	if _, res := admit(g2, 10, 10); res.Outcome != scheduler.Admitted {
		t.Fatalf("after the cancel: %+v", res)
	}
}
