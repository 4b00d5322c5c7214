package worker_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/scheduler"
	"github.com/sluice-dev/sluice/usage"
)

// outageGroup is the model group's outage rule in these tests: three
// failures in a row, probes from 250 ms doubling to 2 s.
const outageGroup = "    outage_failures: 3\n    outage_window: 30s\n    probe_interval: 250ms\n    probe_interval_max: 2s\n"

// submitMany queues n jobs spread over users (each answer reply tokens
// long) and returns their ids.
func submitMany(t *testing.T, e *harness.Env, n, users, reply int) []string {
	t.Helper()
	ids := make([]string, n)
	for i := range ids {
		ids[i] = e.Submit(t, harness.JobBody(fmt.Sprintf("student-%02d", i%users), fmt.Sprintf("question %d [[reply_tokens=%d]]", i, reply))).ID
	}
	return ids
}

// waitAll waits for every job to end and returns them by id.
func waitAll(t *testing.T, e *harness.Env, ids []string, within time.Duration) map[string]jobs.View {
	t.Helper()
	out := make(map[string]jobs.View, len(ids))
	harness.Eventually(t, within, func() bool {
		for _, id := range ids {
			if v, ok := out[id]; ok && v.Status.Terminal() {
				continue
			}
			// The api may answer 5xx for a moment after a Redis fault
			// (the subject of other tests): read the record again.
			resp, b := e.Do(t, http.MethodGet, "/v1/jobs/"+id, harness.TenantKey, nil)
			var v jobs.View
			if resp.StatusCode != http.StatusOK || json.Unmarshal(b, &v) != nil {
				return false
			}
			out[id] = v
			if !v.Status.Terminal() {
				return false
			}
		}
		return true
	}, "%d jobs to finish", len(ids))
	return out
}

func gauges(t *testing.T, e *harness.Env) scheduler.Gauges {
	t.Helper()
	g, err := e.Sched.Gauges(context.Background(), &e.Config.ModelGroups[0])
	if err != nil {
		t.Fatal(err)
	}
	return g
}

// record loads a job's full record (failure counts are not in the view).
func record(t *testing.T, e *harness.Env, id string) *jobs.Job {
	t.Helper()
	j, err := e.Store.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return j
}

// watch follows the group's health while an outage scenario runs: it
// records the failures no job may show (a job that failed) and the
// dispatches made while the group was in outage, which must all be probes.
type watch struct {
	t    *testing.T
	e    *harness.Env
	ids  []string
	stop chan struct{}
	done chan struct{}

	mu               sync.Mutex
	entered          time.Time // when the outage was first seen
	dispatchedAtIn   float64   // dispatched_total when it was first seen
	lastDispatched   float64   // dispatched_total at the last sample in outage
	lastProbes       int64     // failed probes at that sample
	lastProbing      bool
	samplesInOutage  int
	probesAtDispatch int64
}

func startWatch(t *testing.T, e *harness.Env, ids []string) *watch {
	w := &watch{t: t, e: e, ids: ids, stop: make(chan struct{}), done: make(chan struct{})}
	go w.run()
	return w
}

func (w *watch) run() {
	defer close(w.done)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	ctx := context.Background()
	for {
		select {
		case <-w.stop:
			return
		case <-tick.C:
		}
		g, err := w.e.Sched.Gauges(ctx, &w.e.Config.ModelGroups[0])
		if err != nil || g.Outage == nil {
			continue
		}
		d := readDispatched(w.e)
		w.mu.Lock()
		if w.entered.IsZero() {
			w.entered = time.Now()
			w.dispatchedAtIn = d
			w.probesAtDispatch = g.Outage.Probes
		}
		w.samplesInOutage++
		w.lastDispatched, w.lastProbes, w.lastProbing = d, g.Outage.Probes, g.Outage.Probing
		w.mu.Unlock()
	}
}

func (w *watch) finish() {
	close(w.stop)
	<-w.done
}

// readDispatched reads dispatched_total straight from the shared metrics
// registry's page (without a testing.TB: it runs on the watch goroutine).
func readDispatched(e *harness.Env) float64 {
	resp, err := http.Get(e.API.URL + "/metrics")
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	var sb strings.Builder
	buf := make([]byte, 32<<10)
	for {
		n, err := resp.Body.Read(buf)
		sb.Write(buf[:n])
		if err != nil {
			break
		}
	}
	v, _ := harness.Metric(sb.String(), `sluice_dispatched_total{group="sonnet"}`)
	return v
}

// TestUpstreamOutageHoldsTheQueue: the upstream's listener closes for 30 s
// while 8 jobs run and 60 wait, then comes back on the same address. Every
// job succeeds; no job spends more than one of its attempts on the outage;
// while the group is in outage only probes are dispatched; the first call
// after the upstream's return comes within a probe interval (+1 s).
func TestUpstreamOutageHoldsTheQueue(t *testing.T) {
	if testing.Short() {
		t.Skip("a 30-second outage")
	}
	t.Parallel()
	e := harness.Start(t, harness.Options{Fake: fakeanthropic.Config{TokensPerSecond: 20}, GroupExtra: outageGroup})
	ids := submitMany(t, e, 68, 17, 40) // 2 s answers; 8 run at once
	harness.Eventually(t, 20*time.Second, func() bool { return e.Fake.Stats().InFlight == 8 }, "8 calls to run")

	w := startWatch(t, e, ids)
	e.Upstream.Down()
	downAt := time.Now()
	harness.Eventually(t, 10*time.Second, func() bool { return gauges(t, e).Outage != nil }, "the group to go into outage")
	t.Logf("outage entered %s after the upstream went down", time.Since(downAt).Round(time.Millisecond))

	// Hold the outage for 30 s, checking as it goes that nothing fails.
	for time.Since(downAt) < 30*time.Second {
		for _, id := range ids[:10] {
			if v := e.Get(t, id); v.Status == jobs.Failed {
				t.Fatalf("job %s failed during the outage: %+v", id, v.Error)
			}
		}
		time.Sleep(500 * time.Millisecond) // the scenario's outage length, not a wait for work
	}
	g := gauges(t, e)
	if g.Outage == nil {
		t.Fatal("the group left outage while the upstream was still down")
	}
	probes := g.Outage.Probes
	e.Upstream.Up(t)
	upAt := time.Now()

	got := waitAll(t, e, ids, 120*time.Second)
	w.finish()
	for _, id := range ids {
		v := got[id]
		if v.Status != jobs.Succeeded {
			t.Fatalf("job %s %s %+v\n%s", id, v.Status, v.Error, tail(e.Logs()))
		}
		if j := record(t, e, id); j.Failures > 1 {
			t.Errorf("job %s used %d attempts on failures (attempts %d); an outage may cost at most the attempt it broke", id, j.Failures, v.Attempts)
		}
	}
	// Dispatches while in outage: only the probes (the failed ones, and
	// at most one in flight when last sampled).
	inOutage := w.lastDispatched - w.dispatchedAtIn
	if want := float64(w.lastProbes - w.probesAtDispatch); inOutage < want || inOutage > want+1 {
		t.Errorf("%v jobs dispatched while in outage, %d probes failed (probing %v): only probes may go", inOutage, w.lastProbes-w.probesAtDispatch, w.lastProbing)
	}
	if probes < 5 || probes > 40 {
		t.Errorf("%d probes in a 30 s outage with probes every 250 ms doubling to 2 s", probes)
	}
	var firstOK time.Time
	for _, r := range e.Fake.Stats().Log {
		if r.Status == http.StatusOK && !r.At.Before(upAt) && (firstOK.IsZero() || r.At.Before(firstOK)) {
			firstOK = r.At
		}
	}
	gap := firstOK.Sub(upAt)
	if gap > 3*time.Second { // probe_interval_max (2 s) + 1 s
		t.Errorf("the first call came %s after the upstream returned; want within a probe interval (2 s) + 1 s", gap)
	}
	if after := gauges(t, e); after.Outage != nil || after.Outages != 1 {
		t.Errorf("after: outage %+v, outages %d; want healthy after exactly one", after.Outage, after.Outages)
	}
	checkBilled(t, e, false)
	t.Logf("68 jobs: 0 failed; %d probes failed during the 30 s outage; first dispatch %s after the upstream's return", probes, gap.Round(time.Millisecond))
}

// TestOverloadStormHoldsTheQueue: every call gets a 529 for 20 s. The group
// enters outage once and leaves it once, every job succeeds, and the
// retrying events say why.
func TestOverloadStormHoldsTheQueue(t *testing.T) {
	if testing.Short() {
		t.Skip("a 20-second storm")
	}
	t.Parallel()
	e := harness.Start(t, harness.Options{Fake: fakeanthropic.Config{TokensPerSecond: 40}, GroupExtra: outageGroup})
	if err := e.Fake.SetFaults(fakeanthropic.FaultRule{Kind: fakeanthropic.FaultOverloaded, Rate: 1}); err != nil {
		t.Fatal(err)
	}
	stormAt := time.Now()
	ids := submitMany(t, e, 30, 10, 20)
	harness.Eventually(t, 10*time.Second, func() bool { return gauges(t, e).Outage != nil }, "the group to go into outage")
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	events := make(chan []harness.SSEEvent, 1)
	go func() { events <- e.Events(t, ctx, ids[0], harness.TenantKey, "") }()
	for time.Since(stormAt) < 20*time.Second {
		if g := gauges(t, e); g.Outages != 1 {
			t.Fatalf("%d outages during one storm", g.Outages)
		}
		time.Sleep(250 * time.Millisecond) // the storm's length, not a wait for work
	}
	if err := e.Fake.SetFaults(); err != nil {
		t.Fatal(err)
	}
	got := waitAll(t, e, ids, 90*time.Second)
	for _, id := range ids {
		if v := got[id]; v.Status != jobs.Succeeded {
			t.Fatalf("job %s %s %+v", id, v.Status, v.Error)
		}
		if j := record(t, e, id); j.Failures != 0 {
			t.Errorf("job %s counts %d failures of its own after a 529 storm", id, j.Failures)
		}
	}
	if g := gauges(t, e); g.Outage != nil || g.Outages != 1 {
		t.Errorf("after the storm: outage %+v, outages %d; want it entered and left once", g.Outage, g.Outages)
	}
	var reasons []string
	for _, ev := range <-events {
		if ev.Event == "retrying" {
			var d struct{ Reason string }
			_ = json.Unmarshal([]byte(ev.Data), &d)
			reasons = append(reasons, d.Reason)
		}
	}
	for _, r := range reasons {
		if r != "overloaded" {
			t.Errorf("retrying reasons %v, want overloaded", reasons)
			break
		}
	}
	var calls529 int
	for _, r := range e.Fake.Stats().Log {
		if r.Status == 529 {
			calls529++
		}
	}
	t.Logf("30 jobs through a 20 s 529 storm: 0 failed; %d calls answered 529 (%d retrying events on the first job)", calls529, len(reasons))
}

// TestOutageLongerThanMaxOutageFailsAndRefunds: with max_outage 5 s and the
// upstream down for 20 s, waiting jobs fail with upstream_unavailable and
// a sentence saying so, every quota reservation comes back exactly once,
// and new requests are refused with a 503 until the upstream returns.
func TestOutageLongerThanMaxOutageFailsAndRefunds(t *testing.T) {
	if testing.Short() {
		t.Skip("a 20-second outage")
	}
	t.Parallel()
	e := harness.Start(t, harness.Options{GroupExtra: outageGroup, UpstreamExtra: "  max_outage: 5s\n",
		TenantExtra: "    requests_per_hour: 100\n    tokens_per_hour: 1000000\n"})
	e.Upstream.Down()
	downAt := time.Now()
	ids := submitMany(t, e, 12, 3, 10)
	got := waitAll(t, e, ids, 40*time.Second)
	for _, id := range ids {
		v := got[id]
		if v.Status != jobs.Failed || v.Error == nil || v.Error.Type != "upstream_unavailable" {
			t.Fatalf("job %s: %s %+v", id, v.Status, v.Error)
		}
		if !strings.Contains(v.Error.Message, "unreachable") && !strings.Contains(v.Error.Message, "failing") {
			t.Errorf("job %s's error does not say what happened: %q", id, v.Error.Message)
		}
	}
	t.Logf("jobs failed %s after the upstream went down; message: %q", time.Since(downAt).Round(time.Millisecond), got[ids[0]].Error.Message)

	// Refunds: nothing reached the upstream, so every user has their whole
	// quota back — exactly: a second refund would show more than the limit.
	for u := range 3 {
		user := fmt.Sprintf("student-%02d", u)
		var q struct {
			Requests struct{ Limit, Remaining float64 }
			Tokens   struct{ Limit, Remaining float64 }
		}
		resp, b := e.Do(t, http.MethodGet, "/v1/users/"+user+"/usage", harness.TenantKey, nil)
		if resp.StatusCode != http.StatusOK || json.Unmarshal(b, &q) != nil {
			t.Fatalf("usage: %d %s", resp.StatusCode, b)
		}
		if q.Requests.Remaining != q.Requests.Limit || q.Tokens.Remaining != q.Tokens.Limit {
			t.Errorf("%s's quota after failed jobs: %s; want everything refunded once", user, b)
		}
	}

	// New work is refused while the outage lasts longer than max_outage.
	resp, b := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, harness.JobBody("late", "hello"))
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(b), "upstream_unavailable") || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("admission during a long outage: %d %s (Retry-After %q)", resp.StatusCode, b, resp.Header.Get("Retry-After"))
	}

	for time.Since(downAt) < 20*time.Second {
		time.Sleep(250 * time.Millisecond) // the scenario's outage length
	}
	e.Upstream.Up(t)
	// With no job left to probe with, the dispatcher probes on its own (a
	// free count_tokens call) and reopens the group: admission accepts
	// work again and it runs.
	var v jobs.View
	harness.Eventually(t, 30*time.Second, func() bool {
		resp, b := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, harness.JobBody("late", "hello again"))
		if resp.StatusCode != http.StatusAccepted {
			return false
		}
		_ = json.Unmarshal(b, &v)
		return true
	}, "admission to reopen after the upstream came back")
	if v = e.WaitTerminal(t, v.ID, 30*time.Second); v.Status != jobs.Succeeded {
		t.Fatalf("after the outage: %s %+v", v.Status, v.Error)
	}
}

// blipScenario runs 40 streaming jobs, does fault to Redis mid-stream, then
// heal, and checks every job succeeded with exactly one complete upstream
// call each.
func blipScenario(t *testing.T, fault, heal func(*harness.Env), hold time.Duration) {
	e := harness.Start(t, harness.Options{Fake: fakeanthropic.Config{TokensPerSecond: 20}, MaxConcurrency: 40})
	ids := submitMany(t, e, 40, 40, 40) // 2 s answers, one user each
	harness.Eventually(t, 20*time.Second, func() bool { return e.Fake.Stats().InFlight >= 30 }, "the calls to stream")
	fault(e)
	time.Sleep(hold) // the fault's length, not a wait for work
	heal(e)
	got := waitAll(t, e, ids, 90*time.Second)
	for _, id := range ids {
		if v := got[id]; v.Status != jobs.Succeeded {
			t.Fatalf("job %s %s %+v\n%s", id, v.Status, v.Error, tail(e.Logs()))
		}
	}
	complete := map[string]int{}
	total := 0
	for _, r := range e.Fake.Stats().Log {
		if r.Complete {
			complete[r.UserID]++
			total++
		}
	}
	dup := 0
	for _, n := range complete {
		if n > 1 {
			dup += n - 1
		}
	}
	if dup != 0 || len(complete) != 40 {
		t.Fatalf("%d complete upstream calls for 40 jobs (%d users answered, %d bought twice)", total, len(complete), dup)
	}
	checkBilled(t, e, true)
	t.Logf("40 jobs: 0 failed, 0 answers bought twice (%d upstream calls in all)", len(e.Fake.Stats().Log))
}

func TestRedisKilledMidStreamBuysNoAnswerTwice(t *testing.T) {
	t.Parallel()
	blipScenario(t, func(e *harness.Env) { e.Redis.Kill(t) }, func(e *harness.Env) { e.Redis.Revive(t) }, 4*time.Second)
}

func TestRedisStalledMidStreamBuysNoAnswerTwice(t *testing.T) {
	if testing.Short() {
		t.Skip("a 20-second stall")
	}
	t.Parallel()
	blipScenario(t, func(e *harness.Env) { e.Redis.Pause(t) }, func(e *harness.Env) { e.Redis.Resume(t) }, 20*time.Second)
}

// checkBilled compares the usage statistics with what the fake upstream
// served: every call that reached it is counted once, and (exact) the
// output tokens are those it produced.
func checkBilled(t *testing.T, e *harness.Env, exact bool) {
	t.Helper()
	var out int64
	log := e.Fake.Stats().Log
	for _, r := range log {
		out += int64(r.OutputTokens)
	}
	var rep *usage.Report
	harness.Eventually(t, 10*time.Second, func() bool {
		var err error
		rep, err = e.Usage.Query(context.Background(), e.Config.GroupNames(), []string{"acme"}, usage.Hour, 2, 0) // 2: the run may cross an hour
		return err == nil && rep.Totals.UpstreamCalls >= int64(len(log))
	}, "the usage statistics to count %d upstream calls", len(log))
	tot := rep.Totals
	if tot.UpstreamCalls != int64(len(log)) {
		t.Errorf("usage counts %d upstream calls; the upstream served %d", tot.UpstreamCalls, len(log))
	}
	if exact && tot.OutputTokens != out {
		t.Errorf("usage counts %d output tokens; the upstream produced %d", tot.OutputTokens, out)
	}
	t.Logf("usage: %d upstream calls, %d output tokens (%d estimated); the upstream served %d calls, %d output tokens",
		tot.UpstreamCalls, tot.OutputTokens, tot.EstimatedTokens, len(log), out)
}

func tail(s string) string {
	if len(s) > 8000 {
		return "…" + s[len(s)-8000:]
	}
	return s
}
