package scheduler_test

import (
	"context"
	"fmt"
	"math"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/redistest"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/scheduler"
)

type env struct {
	s     *scheduler.Scheduler
	store *jobs.Store
	clk   *harness.Clock
	g     *config.ModelGroup
}

func newEnv(t *testing.T, g config.ModelGroup) *env { return newEnvLease(t, g, time.Hour) }

func newEnvLease(t *testing.T, g config.ModelGroup, lease time.Duration) *env {
	t.Helper()
	r := redistest.Start(t)
	rdb := r.Client(t)
	clk := harness.NewClock(time.Date(2026, 11, 29, 14, 0, 0, 0, time.UTC))
	store := jobs.NewStore(rdb, jobs.Options{})
	if g.Name == "" {
		g.Name = "g"
	}
	if g.Burst == 0 {
		g.Burst = time.Minute // bucket capacity = the per-minute limit: easy arithmetic
	}
	if g.MaxConcurrency == 0 {
		g.MaxConcurrency = 1000
	}
	return &env{s: scheduler.New(rdb, store, scheduler.Options{Clock: clk.Now, LeaseTTL: lease}), store: store, clk: clk, g: &g}
}

// admit queues a job for user (tenant "t") with an input estimate and
// max_tokens, and returns its id.
func (e *env) admit(t *testing.T, user string, in, out int, weight float64) string {
	t.Helper()
	j := &jobs.Job{ID: jobs.NewID(e.g.Name), Tenant: "t", UserID: user, Model: "m", Group: e.g.Name,
		MaxTokens: out, Request: []byte(`{}`), CreatedAt: e.clk.Now()}
	if res, err := e.s.Admit(context.Background(), scheduler.Admission{Job: j, Group: e.g, InputEstimate: in, Policy: config.UserPolicy{Weight: weight}}); err != nil || res.Outcome != scheduler.Admitted {
		t.Fatal(err)
	}
	return j.ID
}

// settle closes job id's limiter reservation (not final: no quota).
func (e *env) settle(id string, used scheduler.Used, d time.Duration) (bool, error) {
	ok, _, err := e.s.Settle(context.Background(), scheduler.Settlement{Group: e.g, Job: &jobs.Job{ID: id, Tenant: "t", UserID: "u"}, Used: used, Duration: d})
	return ok, err
}

func (e *env) dispatch(t *testing.T, max int) scheduler.Result {
	t.Helper()
	r, err := e.s.Dispatch(context.Background(), e.g, max)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func (e *env) levels(t *testing.T) scheduler.Levels {
	t.Helper()
	l, err := e.s.Levels(context.Background(), e.g.Name)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func near(a, b float64) bool { return math.Abs(a-b) < 1e-6 }

func TestBucketsReserveRefillAndWait(t *testing.T) {
	e := newEnv(t, config.ModelGroup{RPM: 3, InputTPM: 600, OutputTPM: 6000})
	for range 4 {
		e.admit(t, "u", 100, 10, 1)
	}
	r := e.dispatch(t, 10)
	if len(r.Jobs) != 3 || r.State != scheduler.Wait {
		t.Fatalf("dispatched %d, state %s; want 3 then wait (3 RPM)", len(r.Jobs), r.State)
	}
	// The request bucket is empty and refills at 3/min: 1 request in 20 s.
	if r.Wait != 20*time.Second {
		t.Fatalf("wait = %s, want 20s", r.Wait)
	}
	l := e.levels(t)
	// Token buckets hold 95% of their limit: 570 and 5700.
	if !near(l.Requests, 0) || !near(l.Input, 270) || !near(l.Output, 5670) || l.Reserved != 3 {
		t.Fatalf("levels = %+v", l)
	}
	e.clk.Advance(19 * time.Second)
	if r := e.dispatch(t, 10); len(r.Jobs) != 0 || r.Wait != time.Second {
		t.Fatalf("at 19s: %+v, want nothing and 1s to wait", r)
	}
	e.clk.Advance(time.Second)
	if r := e.dispatch(t, 10); len(r.Jobs) != 1 || r.State != scheduler.Empty {
		t.Fatalf("at 20s: %+v, want the 4th job", r)
	}
}

func TestSettleReconcilesExactlyOnce(t *testing.T) {
	e := newEnv(t, config.ModelGroup{RPM: 100, InputTPM: 1000, OutputTPM: 1000})
	id := e.admit(t, "u", 300, 500, 1)
	if r := e.dispatch(t, 1); len(r.Jobs) != 1 {
		t.Fatalf("%+v", r)
	}
	l := e.levels(t)
	if !near(l.Input, 650) || !near(l.Output, 450) || l.Leases != 1 {
		t.Fatalf("after reserving: %+v", l)
	}
	// The upstream used 250 input and 120 output: the rest comes back.
	ok, err := e.settle(id, scheduler.Used{Requests: 1, Input: 250, Output: 120}, time.Second)
	if err != nil || !ok {
		t.Fatalf("settle: %v %v", ok, err)
	}
	l = e.levels(t)
	if !near(l.Input, 700) || !near(l.Output, 830) || !near(l.Requests, 99) || l.Reserved != 0 || l.Leases != 0 {
		t.Fatalf("after settling: %+v", l)
	}
	// A second settle (a duplicate delivery, a refund after success) changes nothing.
	ok, err = e.settle(id, scheduler.Used{}, 0)
	if err != nil || ok {
		t.Fatalf("second settle: %v %v", ok, err)
	}
	if l2 := e.levels(t); l2 != l {
		t.Fatalf("second settle changed levels: %+v → %+v", l, l2)
	}
}

func TestRefundAllWhenUpstreamNeverReached(t *testing.T) {
	e := newEnv(t, config.ModelGroup{RPM: 10, InputTPM: 1000, OutputTPM: 1000})
	id := e.admit(t, "u", 400, 300, 1)
	e.dispatch(t, 1)
	if _, err := e.settle(id, scheduler.Used{}, 0); err != nil {
		t.Fatal(err)
	}
	if l := e.levels(t); !near(l.Requests, 10) || !near(l.Input, 950) || !near(l.Output, 950) {
		t.Fatalf("levels after refund = %+v, want full buckets", l)
	}
}

func TestUsingMoreThanReservedGoesIntoDebt(t *testing.T) {
	e := newEnv(t, config.ModelGroup{RPM: 10, InputTPM: 1000, OutputTPM: 1000})
	id := e.admit(t, "u", 100, 100, 1)
	e.dispatch(t, 1)
	e.settle(id, scheduler.Used{Requests: 1, Input: 1300, Output: 100}, 0)
	if l := e.levels(t); !near(l.Input, -350) {
		t.Fatalf("input level = %v, want -350 (under-estimate charged)", l.Input)
	}
	e.admit(t, "u", 100, 100, 1)
	// -350 → 100 needs 450 tokens at 1000/min = 27 s.
	if r := e.dispatch(t, 1); r.State != scheduler.Wait || r.Wait != 27*time.Second {
		t.Fatalf("%+v, want wait 27s", r)
	}
}

func TestJobLargerThanBucketRunsWhenBucketFull(t *testing.T) {
	e := newEnv(t, config.ModelGroup{RPM: 60, InputTPM: 6000, OutputTPM: 6000})
	// Capacity: 5700 input tokens. A 6000-token job fits only a full bucket.
	e.admit(t, "u", 6000, 10, 1)
	e.admit(t, "u", 6000, 10, 1)
	r := e.dispatch(t, 5)
	if len(r.Jobs) != 1 || r.State != scheduler.Wait {
		t.Fatalf("%+v", r)
	}
	// Level -300: full again after 6000 tokens at 100/s = 60 s.
	if r.Wait != 60*time.Second {
		t.Fatalf("wait %s, want 60s", r.Wait)
	}
}

func TestRequestBurstPacesRequests(t *testing.T) {
	e := newEnv(t, config.ModelGroup{RPM: 60, InputTPM: 600000, OutputTPM: 600000, Burst: 2 * time.Second})
	for range 5 {
		e.admit(t, "u", 1, 1, 1)
	}
	// 2 s of 60 RPM: two at once, then one a second.
	if r := e.dispatch(t, 10); len(r.Jobs) != 2 || r.Wait != time.Second {
		t.Fatalf("%+v", r)
	}
}

func TestConcurrencyLeases(t *testing.T) {
	e := newEnvLease(t, config.ModelGroup{RPM: 1000, InputTPM: 100000, OutputTPM: 100000, MaxConcurrency: 2}, 10*time.Second)
	a := e.admit(t, "u", 10, 10, 1)
	e.admit(t, "u", 10, 10, 1)
	e.admit(t, "u", 10, 10, 1)
	r := e.dispatch(t, 10)
	if len(r.Jobs) != 2 || r.State != scheduler.Full || r.Wait != 10*time.Second {
		t.Fatalf("%+v, want 2 dispatched, full until the first lease ends (10s)", r)
	}
	e.settle(a, scheduler.Used{Requests: 1, Input: 10, Output: 10}, time.Second)
	if r := e.dispatch(t, 10); len(r.Jobs) != 1 {
		t.Fatalf("after a call finished: %+v", r)
	}
}

func TestDeadWorkersLeaseRequeuesJobWithoutChargingTwice(t *testing.T) {
	e := newEnvLease(t, config.ModelGroup{RPM: 1000, InputTPM: 600, OutputTPM: 100000, MaxConcurrency: 1}, 10*time.Second)
	ctx := context.Background()
	id := e.admit(t, "u", 400, 50, 1)
	r := e.dispatch(t, 1)
	if len(r.Jobs) != 1 || r.Jobs[0].Dispatch != 1 {
		t.Fatalf("%+v", r)
	}
	before := e.levels(t)
	// The worker renews once, then dies: nobody renews.
	e.clk.Advance(5 * time.Second)
	if ok, _ := e.s.Renew(ctx, e.g.Name, id, 1); !ok {
		t.Fatal("live lease did not renew")
	}
	e.clk.Advance(10 * time.Second)
	// The round that finds the lease past its time gives its holder a
	// grace (a third of the lease, at least 2 s) to renew it: nothing moves.
	if r = e.dispatch(t, 1); len(r.Jobs) != 0 {
		t.Fatalf("dispatched during the grace: %+v", r)
	}
	e.clk.Advance(3 * time.Second)
	if r = e.dispatch(t, 1); len(r.Jobs) != 0 {
		t.Fatalf("dispatched before the grace (3.3 s) ended: %+v", r)
	}
	e.clk.Advance(500 * time.Millisecond)
	// The next round after the grace returns the job to the queue and
	// dispatches it again, reusing its reservation.
	r = e.dispatch(t, 1)
	if len(r.Jobs) != 1 || r.Jobs[0].JobID != id || r.Jobs[0].Dispatch != 2 {
		t.Fatalf("re-dispatch: %+v", r)
	}
	// The lease was taken back: the first dispatch's holder may not renew
	// it, the second's may.
	if ok, _ := e.s.Renew(ctx, e.g.Name, id, 1); ok {
		t.Fatal("a taken-back lease renewed for its old holder")
	}
	if ok, _ := e.s.Renew(ctx, e.g.Name, id, 2); !ok {
		t.Fatal("the new dispatch's lease did not renew")
	}
	after := e.levels(t)
	// Only refill happened (18.5 s at 10 tokens/s), no second charge.
	wantIn := before.Input + 185
	if !near(after.Input, wantIn) || after.Reserved != 1 {
		t.Fatalf("levels after re-dispatch %+v (before %+v), want input %v", after, before, wantIn)
	}
}

func TestFreezeStopsDispatchFleetWideThenResumesPaced(t *testing.T) {
	e := newEnv(t, config.ModelGroup{RPM: 60, InputTPM: 100000, OutputTPM: 100000})
	ctx := context.Background()
	for range 3 {
		e.admit(t, "u", 10, 10, 1)
	}
	until, err := e.s.Freeze(ctx, e.g, scheduler.Pushback429, 2*time.Second)
	if err != nil || !until.Equal(e.clk.Now().Add(2*time.Second)) {
		t.Fatalf("freeze until %s err %v", until, err)
	}
	if r := e.dispatch(t, 5); len(r.Jobs) != 0 || r.State != scheduler.Wait || r.Wait != 2*time.Second {
		t.Fatalf("while frozen: %+v", r)
	}
	e.clk.Advance(2 * time.Second)
	// Buckets were emptied: the first request after the freeze needs 1 s of refill.
	if r := e.dispatch(t, 5); len(r.Jobs) != 0 || r.Wait != time.Second {
		t.Fatalf("just after the freeze: %+v", r)
	}
	e.clk.Advance(time.Second)
	if r := e.dispatch(t, 5); len(r.Jobs) != 1 {
		t.Fatalf("paced resume: %+v, want exactly one", r)
	}
}

func TestBurstOf529sSlowsGroup(t *testing.T) {
	e := newEnv(t, config.ModelGroup{RPM: 60, InputTPM: 100000, OutputTPM: 100000, Burst: time.Second})
	ctx := context.Background()
	for i := range 3 {
		if _, err := e.s.Freeze(ctx, e.g, scheduler.Pushback529, time.Second); err != nil {
			t.Fatal(err)
		}
		if i < 2 {
			if l := e.levels(t); !l.Frozen.IsZero() && l.Frozen.After(e.clk.Now()) {
				t.Fatalf("one 529 froze the group")
			}
		}
	}
	e.clk.Advance(time.Second)
	// Pace factor 0.5: 1 request a second becomes one in two.
	e.admit(t, "u", 1, 1, 1)
	e.admit(t, "u", 1, 1, 1)
	r := e.dispatch(t, 5)
	if len(r.Jobs) != 1 || r.State != scheduler.Wait || r.Wait < 1900*time.Millisecond || r.Wait > 2100*time.Millisecond {
		t.Fatalf("%+v, want one job then about 2s", r)
	}
}

func TestObserveHeaders(t *testing.T) {
	e := newEnv(t, config.ModelGroup{RPM: 100, InputTPM: 100000, OutputTPM: 100000, Burst: 6 * time.Second})
	ctx := context.Background()
	h := http.Header{}
	h.Set("anthropic-ratelimit-requests-limit", "50")     // lower than configured: adopt
	h.Set("anthropic-ratelimit-requests-remaining", "47") // capacity 5 of 50: level 47-45 = 2
	h.Set("anthropic-ratelimit-input-tokens-limit", "100000")
	h.Set("anthropic-ratelimit-input-tokens-remaining", "96000") // 95500 - (100000-95000) = 90500
	if _, err := e.s.Observe(ctx, e.g, h, true); err != nil {
		t.Fatal(err)
	}
	l := e.levels(t)
	if !near(l.Requests, 2) || !near(l.Input, 90500) || !near(l.Output, 95000) {
		t.Fatalf("levels %+v", l)
	}
	for range 4 {
		e.admit(t, "u", 1, 1, 1)
	}
	r := e.dispatch(t, 10)
	// 2 now, then the adopted 50 RPM: 1.2 s for the next.
	if len(r.Jobs) != 2 || r.Wait != 1200*time.Millisecond {
		t.Fatalf("%+v", r)
	}
}

// A table of arrival patterns and the dispatch order fair queuing gives.
func TestFairOrder(t *testing.T) {
	type arrival struct {
		user   string
		cost   int // input estimate; max_tokens 0 would be refused, so cost is split in+out
		weight float64
		after  int // dispatches to run before this arrival (0 = at the start)
	}
	tests := []struct {
		name     string
		arrivals []arrival
		want     string // users in dispatch order
	}{
		{"one user stays FIFO", []arrival{{"a", 10, 1, 0}, {"a", 50, 1, 0}, {"a", 10, 1, 0}}, "a a a"},
		{"equal users alternate", []arrival{{"a", 10, 1, 0}, {"a", 10, 1, 0}, {"a", 10, 1, 0}, {"b", 10, 1, 0}, {"b", 10, 1, 0}, {"b", 10, 1, 0}}, "a b a b a b"},
		{"charged in tokens", []arrival{{"a", 30, 1, 0}, {"a", 30, 1, 0}, {"b", 10, 1, 0}, {"b", 10, 1, 0}, {"b", 10, 1, 0}, {"b", 10, 1, 0}}, "a b b b a b"},
		{"weight 2 gets twice", []arrival{{"a", 10, 2, 0}, {"a", 10, 2, 0}, {"a", 10, 2, 0}, {"a", 10, 2, 0}, {"b", 10, 1, 0}, {"b", 10, 1, 0}}, "a b a a b a"},
		{"newcomer behind a backlog is next", []arrival{{"h", 10, 1, 0}, {"h", 10, 1, 0}, {"h", 10, 1, 0}, {"h", 10, 1, 0}, {"h", 10, 1, 0}, {"n", 10, 1, 2}}, "h h n h h h"},
		// a waits idle while b runs six jobs; when both queue again, a's tags
		// start at V, not where it left off (banked credit would give a a a).
		{"idle user banks no credit", []arrival{{"a", 10, 1, 0}, {"b", 10, 1, 0}, {"b", 10, 1, 0}, {"b", 10, 1, 0}, {"b", 10, 1, 0}, {"b", 10, 1, 0}, {"b", 10, 1, 0},
			{"a", 10, 1, 7}, {"a", 10, 1, 7}, {"a", 10, 1, 7}, {"b", 10, 1, 7}, {"b", 10, 1, 7}, {"b", 10, 1, 7}}, "a b b b b b b a a b a b b"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, config.ModelGroup{RPM: 100000, InputTPM: 10000000, OutputTPM: 10000000})
			users := map[string]string{}
			var order []string
			dispatched := 0
			pending := tc.arrivals
			for len(pending) > 0 || true {
				for len(pending) > 0 && pending[0].after <= dispatched {
					a := pending[0]
					pending = pending[1:]
					users[e.admit(t, a.user, a.cost-1, 1, a.weight)] = a.user
				}
				r := e.dispatch(t, 1)
				if len(r.Jobs) == 0 {
					if len(pending) == 0 {
						break
					}
					t.Fatalf("queue empty with arrivals pending")
				}
				order = append(order, users[r.Jobs[0].JobID])
				dispatched++
			}
			if diff := cmp.Diff(tc.want, strings.Join(order, " ")); diff != "" {
				t.Fatalf("dispatch order (-want +got):\n%s", diff)
			}
		})
	}
}

func TestPositionIsTrueRank(t *testing.T) {
	e := newEnv(t, config.ModelGroup{RPM: 60, InputTPM: 100000, OutputTPM: 100000, Burst: time.Second})
	ctx := context.Background()
	var heavy []string
	for range 5 {
		heavy = append(heavy, e.admit(t, "heavy", 9, 1, 1))
	}
	light := e.admit(t, "light", 9, 1, 1)
	pos := func(id string) int {
		j, err := e.store.Get(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		p, _, ok, err := e.s.Position(ctx, j, e.g)
		if err != nil || !ok {
			t.Fatalf("position of %s: %v %v", id, ok, err)
		}
		return p
	}
	// The light user's job ties with heavy's first; arrival breaks the tie.
	if got := []int{pos(heavy[0]), pos(light), pos(heavy[1]), pos(heavy[4])}; !cmp.Equal(got, []int{1, 2, 3, 6}) {
		t.Fatalf("positions %v", got)
	}
	// And dispatch follows positions.
	var order []string
	for range 6 {
		e.clk.Advance(time.Second)
		for _, p := range e.dispatch(t, 10).Jobs {
			order = append(order, p.JobID)
		}
	}
	want := []string{heavy[0], light, heavy[1], heavy[2], heavy[3], heavy[4]}
	if diff := cmp.Diff(want, order); diff != "" {
		t.Fatalf("order (-want +got):\n%s", diff)
	}
}

func TestETA(t *testing.T) {
	e := newEnv(t, config.ModelGroup{RPM: 6, InputTPM: 100000, OutputTPM: 100000, Burst: 10 * time.Second})
	ctx := context.Background()
	var ids []string
	for i := range 5 {
		ids = append(ids, e.admit(t, fmt.Sprint("u", i), 10, 10, 1))
	}
	// Bucket holds 1 request; 6 RPM = one every 10 s. Position p starts
	// when p requests are available: (p-1) × 10 s.
	for i, id := range ids {
		j, _ := e.store.Get(ctx, id)
		_, eta, _, _ := e.s.Position(ctx, j, e.g)
		if want := i * 10; eta != want {
			t.Errorf("position %d: eta %d, want %d", i+1, eta, want)
		}
	}
}

// A holder that could not renew while Redis was away keeps its lease if it
// renews within the grace the first round after gives it, however long
// the outage was; its next silence gets a grace again.
func TestLeasePastItsTimeIsKeptWhenItsHolderRenewsInTheGrace(t *testing.T) {
	e := newEnvLease(t, config.ModelGroup{RPM: 1000, InputTPM: 100000, OutputTPM: 100000, MaxConcurrency: 1}, 6*time.Second)
	ctx := context.Background()
	id := e.admit(t, "u", 10, 10, 1)
	e.admit(t, "v", 10, 10, 1) // waits for the slot
	if r := e.dispatch(t, 1); len(r.Jobs) != 1 || r.Jobs[0].JobID != id {
		t.Fatalf("%+v", r)
	}
	for round := range 2 {
		e.clk.Advance(time.Minute) // Redis away a minute: no renewal, no round
		if r := e.dispatch(t, 1); len(r.Jobs) != 0 {
			t.Fatalf("round %d: the first round after the outage dispatched %+v", round, r)
		}
		e.clk.Advance(time.Second)
		if ok, err := e.s.Renew(ctx, e.g.Name, id, 1); !ok || err != nil {
			t.Fatalf("round %d: the holder could not renew in the grace: %v %v", round, ok, err)
		}
		e.clk.Advance(5 * time.Second) // past the grace, inside the renewed lease
		if r := e.dispatch(t, 1); len(r.Jobs) != 0 {
			t.Fatalf("round %d: a renewed lease was taken back: %+v", round, r)
		}
		if ok, _ := e.s.Renew(ctx, e.g.Name, id, 1); !ok {
			t.Fatalf("round %d: the holder lost its lease", round)
		}
	}
}

// On Redis's clock (no clock given), a job's created_at is the moment the
// admission reached Redis, not the caller's earlier stamp: the record and
// the admitted job say the same, on the clock its dispatch will use.
func TestCreatedAtIsTheAdmissionOnRedisClock(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	store := jobs.NewStore(rdb, jobs.Options{})
	s := scheduler.New(rdb, store, scheduler.Options{LeaseTTL: time.Hour})
	g := &config.ModelGroup{Name: "g", RPM: 1000, InputTPM: 1e6, OutputTPM: 1e6, MaxConcurrency: 10, Burst: time.Minute}
	ctx := context.Background()
	stamped := time.Now().Add(-time.Hour).UTC().Truncate(time.Millisecond) // a caller whose stamp came long before
	j := &jobs.Job{ID: jobs.NewID(g.Name), Tenant: "t", UserID: "ann", Model: "m", Group: g.Name,
		MaxTokens: 10, Request: []byte(`{}`), CreatedAt: stamped}
	if res, err := s.Admit(ctx, scheduler.Admission{Job: j, Group: g, InputEstimate: 5, Policy: config.UserPolicy{Weight: 1}}); err != nil || res.Outcome != scheduler.Admitted {
		t.Fatal(res, err)
	}
	rt, err := rdb.Time(ctx).Result()
	if err != nil {
		t.Fatal(err)
	}
	if d := rt.Sub(j.CreatedAt); d < 0 || d > 5*time.Second {
		t.Fatalf("created_at %v, Redis's clock %v: want the admission's moment", j.CreatedAt, rt)
	}
	got, err := store.Get(ctx, j.ID)
	if err != nil {
		t.Fatal(err)
	}
	if !got.CreatedAt.Equal(j.CreatedAt) {
		t.Fatalf("the record's created_at %v, the admitted job's %v", got.CreatedAt, j.CreatedAt)
	}
}
