package scheduler_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/redistest"
	"github.com/sluice-dev/sluice/internal/rkeys"
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

// TestQuotaRetryNotCharged: a request retried with its Idempotency-Key gets
// its earlier job back even when the first one used up the user's quota,
// and is not charged again; the same key with another body is a conflict.
// On one Redis the admission script checks the quota after the key; in a
// cluster the quota's own step comes first, and a refusal looks the key up.
// Both must answer alike.
func TestQuotaRetryNotCharged(t *testing.T) {
	inEachMode(t, func(t *testing.T, rdb redis.UniversalClient) {
		clk := harness.NewClock(time.Date(2026, 11, 29, 14, 0, 0, 0, time.UTC))
		s := scheduler.New(rdb, jobs.NewStore(rdb, jobs.Options{}), scheduler.Options{Clock: clk.Now, LeaseTTL: time.Hour})
		ctx := context.Background()
		g := &config.ModelGroup{Name: "g", RPM: 1000, InputTPM: 1e6, OutputTPM: 1e6, Burst: time.Minute, MaxConcurrency: 10}
		policy := config.UserPolicy{Weight: 1, RequestsPerHour: 1, TokensPerHour: 1000}
		admit := func(key, body string) scheduler.AdmitResult {
			t.Helper()
			j := &jobs.Job{ID: jobs.NewID(g.Name), Tenant: "t", UserID: "u", Model: "m", Group: g.Name,
				MaxTokens: 100, Request: []byte(`{}`), CreatedAt: clk.Now()}
			res, err := s.Admit(ctx, scheduler.Admission{Job: j, Group: g, InputEstimate: 100, Policy: policy,
				IdempotencyKey: key, BodyHash: body})
			if err != nil {
				t.Fatal(err)
			}
			if res.Outcome == scheduler.Admitted {
				res.ReplayOf = j.ID // for the comparison below
			}
			return res
		}
		first := admit("k1", "body-a")
		if first.Outcome != scheduler.Admitted || first.QuotaRemaining != 0 {
			t.Fatalf("first request: %+v, want admitted with 0 requests left", first)
		}
		if r := admit("k1", "body-a"); r.Outcome != scheduler.Replay || r.ReplayOf != first.ReplayOf {
			t.Errorf("retry with the same key and body: %+v, want replay of %s", r, first.ReplayOf)
		}
		if r := admit("k1", "body-b"); r.Outcome != scheduler.Conflict {
			t.Errorf("same key, another body: %+v, want conflict", r)
		}
		if r := admit("k2", "body-c"); r.Outcome != scheduler.OverQuota || r.QuotaWhich != "requests" {
			t.Errorf("a new request: %+v, want refused for the request quota", r)
		}
		rq, tq, err := s.Quotas(ctx, "t", "u", policy)
		if err != nil {
			t.Fatal(err)
		}
		if rq.Remaining != 0 || tq.Remaining != 800 {
			t.Errorf("quotas after the retries: %d requests, %d tokens left, want 0 and 800 (charged once)", rq.Remaining, tq.Remaining)
		}
	})
}

// TestAdmissionRenewsTTLsByPeriod: a user's quota hash lives two hours
// from its last renewal, renewed once an hour (its buckets are full an
// hour after their last change); the user's counts and job index live a
// minute longer than a record from the user's last admission, renewed once
// a minute; the tenant's job index is renewed by every admission. Checked
// with a queue cap (the counts are read anyway) and without one.
func TestAdmissionRenewsTTLsByPeriod(t *testing.T) {
	for _, maxQueued := range []int{0, 100} {
		t.Run(fmt.Sprint("max_queued=", maxQueued), func(t *testing.T) {
			rdb := redistest.Start(t).Client(t)
			clk := harness.NewClock(time.Date(2026, 11, 29, 14, 0, 0, 0, time.UTC))
			s := scheduler.New(rdb, jobs.NewStore(rdb, jobs.Options{}), scheduler.Options{Clock: clk.Now, LeaseTTL: time.Hour})
			ctx := context.Background()
			g := &config.ModelGroup{Name: "one", RPM: 1000, InputTPM: 1e6, OutputTPM: 1e6, Burst: time.Minute, MaxConcurrency: 10}
			policy := config.UserPolicy{Weight: 1, RequestsPerHour: 1000, TokensPerHour: 1e6, MaxQueued: maxQueued}
			var record string
			admit := func() {
				t.Helper()
				j := &jobs.Job{ID: jobs.NewID(g.Name), Tenant: "t", UserID: "u", Model: "m", Group: g.Name,
					MaxTokens: 10, Request: []byte(`{}`), CreatedAt: clk.Now()}
				res, err := s.Admit(ctx, scheduler.Admission{Job: j, Group: g, InputEstimate: 10, Policy: policy})
				if err != nil || res.Outcome != scheduler.Admitted {
					t.Fatal(res, err)
				}
				record = jobs.Key(j.ID)
			}
			ttl := func(k string) time.Duration {
				t.Helper()
				d, err := rdb.TTL(ctx, k).Result()
				if err != nil {
					t.Fatal(err)
				}
				return d
			}
			quota, counts, index, tenant := rkeys.Quota("t", "u"), jobs.CountsKey(g.Name, "t", "u"),
				rkeys.UserJobs(g.Name, "t", "u"), rkeys.TenantJobs(g.Name, "t")
			check := func(when string, want map[string]time.Duration) {
				t.Helper()
				for k, w := range want {
					if d := ttl(k); d < w-2*time.Second || d > w {
						t.Errorf("%s: %s lives %v, want %v", when, k, d, w)
					}
				}
			}

			admit()
			rec := ttl(record)
			if rec <= 0 {
				t.Fatalf("the record lives %v", rec)
			}
			check("first admission", map[string]time.Duration{quota: 2 * time.Hour,
				counts: rec + time.Minute, index: rec + time.Minute, tenant: rec})

			markTTLs(t, rdb)
			clk.Advance(59 * time.Second)
			admit()
			check("59 s later", map[string]time.Duration{quota: ttlMark, counts: ttlMark, index: ttlMark, tenant: rec})

			clk.Advance(time.Second)
			admit()
			check("a minute after the first", map[string]time.Duration{quota: ttlMark,
				counts: rec + time.Minute, index: rec + time.Minute, tenant: rec})

			markTTLs(t, rdb)
			clk.Advance(59 * time.Minute)
			admit()
			check("an hour after the first", map[string]time.Duration{quota: 2 * time.Hour,
				counts: rec + time.Minute, index: rec + time.Minute, tenant: rec})

			// A lost counts hash (its stamp with it) renews at once.
			markTTLs(t, rdb)
			if err := rdb.Del(ctx, counts).Err(); err != nil {
				t.Fatal(err)
			}
			clk.Advance(time.Second)
			admit()
			check("after the counts were lost", map[string]time.Duration{quota: ttlMark,
				counts: rec + time.Minute, index: rec + time.Minute, tenant: rec})
		})
	}
}
