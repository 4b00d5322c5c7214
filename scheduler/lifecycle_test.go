package scheduler_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/redistest"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/redisconn"
	"github.com/sluice-dev/sluice/scheduler"
)

// The lifecycle transitions are single Lua steps whose checks all come
// before any write (lua/lifecycle.lua's header): a refused step must leave
// Redis exactly as it was. These tests bring a job to a state, take a full
// snapshot of Redis, make a step that must be refused, and compare.

// lcEnv is env with the Redis client kept, for snapshots.
type lcEnv struct {
	s      *scheduler.Scheduler
	store  *jobs.Store
	clk    *harness.Clock
	g      *config.ModelGroup
	rdb    *redis.Client
	policy config.UserPolicy
}

// lcLease is the lease of lcEnv's scheduler: a job whose worker stops
// renewing for longer is dispatched again.
const lcLease = 10 * time.Second

func newLifecycleEnv(t *testing.T) *lcEnv {
	t.Helper()
	r := redistest.Start(t)
	rdb := r.Client(t)
	clk := harness.NewClock(time.Date(2026, 11, 29, 14, 0, 0, 0, time.UTC))
	store := jobs.NewStore(rdb, jobs.Options{})
	g := &config.ModelGroup{Name: "g", RPM: 1000, InputTPM: 100000, OutputTPM: 100000, MaxConcurrency: 10,
		Burst: time.Minute, OutageFailures: 1, OutageWindow: 30 * time.Second,
		ProbeInterval: time.Second, ProbeIntervalMax: 30 * time.Second}
	return &lcEnv{
		s:     scheduler.New(rdb, store, scheduler.Options{Clock: clk.Now, LeaseTTL: lcLease}),
		store: store, clk: clk, g: g, rdb: rdb,
		// Quotas, so that admission reserves them and the steps settle them.
		policy: config.UserPolicy{Weight: 1, RequestsPerHour: 100, TokensPerHour: 100000},
	}
}

// admit queues a job (with a deadline an hour away) and returns it as the
// store reads it.
func (e *lcEnv) admit(t *testing.T) *jobs.Job {
	t.Helper()
	j := &jobs.Job{ID: jobs.NewID(e.g.Name), Tenant: "t", UserID: "u", Model: "m", Group: e.g.Name,
		MaxTokens: 50, Request: []byte(`{}`), CreatedAt: e.clk.Now(), DeadlineAt: e.clk.Now().Add(time.Hour)}
	res, err := e.s.Admit(context.Background(), scheduler.Admission{Job: j, Group: e.g, InputEstimate: 100, Policy: e.policy})
	if err != nil || res.Outcome != scheduler.Admitted {
		t.Fatalf("admit: %+v %v", res, err)
	}
	return e.get(t, j.ID)
}

func (e *lcEnv) get(t *testing.T, id string) *jobs.Job {
	t.Helper()
	j, err := e.store.Get(context.Background(), id)
	if err != nil {
		t.Fatalf("get %s: %v", id, err)
	}
	return j
}

// dispatch runs one dispatch round that must pick job j; it returns the
// dispatch number.
func (e *lcEnv) dispatch(t *testing.T, j *jobs.Job) int {
	t.Helper()
	r, err := e.s.Dispatch(context.Background(), e.g, 1)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Jobs) != 1 || r.Jobs[0].JobID != j.ID {
		t.Fatalf("dispatch: %+v, want job %s", r, j.ID)
	}
	return r.Jobs[0].Dispatch
}

func (e *lcEnv) attempt(j *jobs.Job, d int) scheduler.Attempt {
	return scheduler.Attempt{Group: e.g, Job: j, Dispatch: d}
}

// start dispatches job j and starts its attempt; it returns the dispatch.
func (e *lcEnv) start(t *testing.T, j *jobs.Job) int {
	t.Helper()
	d := e.dispatch(t, j)
	e.clk.Advance(100 * time.Millisecond)
	if _, err := e.s.Start(context.Background(), e.attempt(j, d), e.clk.Now()); err != nil {
		t.Fatalf("start: %v", err)
	}
	e.clk.Advance(time.Second)
	return d
}

// cancel cancels job j (queued or running) and returns the status it had.
func (e *lcEnv) cancel(t *testing.T, j *jobs.Job) jobs.Status {
	t.Helper()
	from, err := e.s.Cancel(context.Background(), e.g, j, e.clk.Now(), e.policy)
	if err != nil {
		t.Fatalf("cancel: %v", err)
	}
	return from
}

// tallies are the statistics every step bumps: a step that counted twice
// shows in the snapshot.
func lcTallies(name string) []jobs.Tally {
	return []jobs.Tally{
		{Key: "sluice:test:tally:" + name, Field: "n", By: 1, TTL: time.Hour},
		{Key: "sluice:test:ztally:" + name, Field: "u", Sorted: true, By: 7, TTL: time.Hour},
	}
}

// The steps, on job j at dispatch d.

func (e *lcEnv) succeed(j *jobs.Job, d int) func() error {
	return func() error {
		return e.s.Succeed(context.Background(), scheduler.Success{
			Attempt: e.attempt(j, d), Result: json.RawMessage(`{"id":"msg_1","content":[]}`), Text: "hello",
			Usage: jobs.Usage{InputTokens: 90, OutputTokens: 20}, Used: scheduler.Used{Requests: 1, Input: 90, Output: 20},
			Duration: 800 * time.Millisecond, At: e.clk.Now(), Policy: e.policy, Tallies: lcTallies("succeeded"),
		})
	}
}

func (e *lcEnv) fail(j *jobs.Job, d int) func() error {
	return func() error {
		return e.s.Fail(context.Background(), scheduler.Failure{
			Attempt: e.attempt(j, d), Error: jobs.Error{Type: "api_error", Message: "it broke"},
			Used: scheduler.Used{Requests: 1, Input: 90}, At: e.clk.Now(), Policy: e.policy, Tallies: lcTallies("failed"),
		})
	}
}

func (e *lcEnv) retry(j *jobs.Job, d int, infra bool) func() error {
	return func() error {
		r := scheduler.Retry{Attempt: e.attempt(j, d), Used: scheduler.Used{Requests: 1, Input: 90},
			Reason: "overloaded", Delay: 5 * time.Second, Failures: 1, Tallies: lcTallies("retrying"),
			Fields: []string{"last_error", "overloaded"}}
		if infra {
			r.Infra, r.Deadline, r.Reason = true, j.DeadlineAt, "upstream_unavailable"
		}
		_, err := e.s.Retry(context.Background(), r)
		return err
	}
}

func (e *lcEnv) stop(j *jobs.Job, d int) func() error {
	return func() error {
		return e.s.Stop(context.Background(), scheduler.Stopped{Attempt: e.attempt(j, d),
			Used: scheduler.Used{Requests: 1, Input: 90, Output: 5}, Policy: e.policy, Tallies: lcTallies("stopped")})
	}
}

func (e *lcEnv) startStep(j *jobs.Job, d int) func() error {
	return func() error {
		_, err := e.s.Start(context.Background(), e.attempt(j, d), e.clk.Now())
		return err
	}
}

func (e *lcEnv) cancelStep(j *jobs.Job) func() error {
	return func() error {
		_, err := e.s.Cancel(context.Background(), e.g, j, e.clk.Now(), e.policy)
		return err
	}
}

func (e *lcEnv) expire(j *jobs.Job) func() error {
	return func() error { return e.s.Expire(context.Background(), e.g, j, e.clk.Now(), e.policy) }
}

// refusal is the error a refused step must return.
type refusal struct {
	sentinel error       // errors.Is, or
	state    jobs.Status // errors.As *jobs.StateError with this Current
}

func (w refusal) String() string {
	if w.sentinel != nil {
		return fmt.Sprintf("%q", w.sentinel)
	}
	return fmt.Sprintf("*jobs.StateError{%s}", w.state)
}

// check reports how err differs from the refusal wanted ("" = it does
// not).
func (w refusal) check(err error) string {
	if err == nil {
		return fmt.Sprintf("the step was accepted; want it refused with %s", w)
	}
	if w.sentinel != nil {
		if errors.Is(err, w.sentinel) {
			return ""
		}
		return fmt.Sprintf("error %q (%T), want %s", err, err, w)
	}
	var se *jobs.StateError
	if !errors.As(err, &se) || se.Current != w.state {
		return fmt.Sprintf("error %q (%T), want %s", err, err, w)
	}
	return ""
}

func stateErr(s jobs.Status) refusal { return refusal{state: s} }
func sentinel(err error) refusal     { return refusal{sentinel: err} }

// ttlMark is the time to live every expiring key is given before a
// snapshot: no step sets it, so a step that refreshed a key's expiry shows.
const ttlMark = 1_000_000 * time.Second

// markTTLs sets every key that expires to expire in ttlMark.
func markTTLs(t *testing.T, rdb *redis.Client) {
	t.Helper()
	ctx := context.Background()
	ks, err := rdb.Keys(ctx, "*").Result()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range ks {
		if d, err := rdb.PTTL(ctx, k).Result(); err != nil {
			t.Fatal(err)
		} else if d > 0 {
			if err := rdb.PExpire(ctx, k, ttlMark).Err(); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// snapshot is every key of Redis: its type, its time to live (to the
// minute: "persist", or minutes left) and its whole value.
func snapshot(t *testing.T, rdb *redis.Client) map[string]string {
	t.Helper()
	ctx := context.Background()
	ks, err := rdb.Keys(ctx, "*").Result()
	if err != nil {
		t.Fatal(err)
	}
	out := make(map[string]string, len(ks))
	for _, k := range ks {
		typ, err := rdb.Type(ctx, k).Result()
		if err != nil {
			t.Fatal(err)
		}
		var val string
		switch typ {
		case "string":
			val, err = rdb.Get(ctx, k).Result()
		case "hash":
			var m map[string]string
			if m, err = rdb.HGetAll(ctx, k).Result(); err == nil {
				fs := make([]string, 0, len(m))
				for f, v := range m {
					fs = append(fs, fmt.Sprintf("%q=%q", f, v))
				}
				sort.Strings(fs)
				val = strings.Join(fs, " ")
			}
		case "zset":
			var zs []redis.Z
			if zs, err = rdb.ZRangeWithScores(ctx, k, 0, -1).Result(); err == nil {
				for _, z := range zs {
					val += fmt.Sprintf("%q:%v ", z.Member, z.Score)
				}
			}
		case "list":
			var l []string
			if l, err = rdb.LRange(ctx, k, 0, -1).Result(); err == nil {
				val = fmt.Sprintf("%q", l)
			}
		case "set":
			var s []string
			if s, err = rdb.SMembers(ctx, k).Result(); err == nil {
				sort.Strings(s)
				val = fmt.Sprintf("%q", s)
			}
		case "stream":
			var xs []redis.XMessage
			if xs, err = rdb.XRange(ctx, k, "-", "+").Result(); err == nil {
				for _, x := range xs {
					val += fmt.Sprintf("%s %v; ", x.ID, x.Values)
				}
			}
		case "none":
			continue // expired between KEYS and TYPE
		default:
			t.Fatalf("snapshot: key %s has type %s", k, typ)
		}
		if err != nil {
			t.Fatalf("snapshot %s (%s): %v", k, typ, err)
		}
		ttl := "persist"
		d, err := rdb.PTTL(ctx, k).Result()
		if err != nil {
			t.Fatal(err)
		}
		if d > 0 {
			ttl = fmt.Sprintf("%dm", d.Round(time.Minute)/time.Minute)
		}
		out[k] = typ + " ttl=" + ttl + " " + val
	}
	return out
}

// refusedChangesNothing makes step, which must be refused with want, and
// checks that it changed no key of Redis and published nothing.
func refusedChangesNothing(t *testing.T, e *lcEnv, step func() error, want refusal) {
	t.Helper()
	ctx := context.Background()
	markTTLs(t, e.rdb)
	before := snapshot(t, e.rdb)
	sub := e.rdb.PSubscribe(ctx, "*")
	defer sub.Close()
	if _, err := sub.Receive(ctx); err != nil { // the subscription's confirmation
		t.Fatal(err)
	}
	now := e.clk.Now()
	if problem := want.check(step()); problem != "" {
		t.Fatal(problem)
	}
	if !e.clk.Now().Equal(now) {
		t.Fatal("the clock moved during the step")
	}
	// The step's messages, if any, come before this marker.
	const marker = "sluice:test:marker"
	if err := e.rdb.Publish(ctx, marker, "end").Err(); err != nil {
		t.Fatal(err)
	}
	for {
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		m, err := sub.ReceiveMessage(rctx)
		cancel()
		if err != nil {
			t.Fatalf("waiting for the marker: %v", err)
		}
		if m.Channel == marker {
			break
		}
		t.Errorf("the refused step published %q on %s", m.Payload, m.Channel)
	}
	if diff := cmp.Diff(before, snapshot(t, e.rdb)); diff != "" {
		t.Fatalf("the refused step changed Redis (-before +after):\n%s", diff)
	}
}

// Each transition, made twice: the second is refused and changes nothing.
func TestLifecycleRepeatedTransitionChangesNothing(t *testing.T) {
	tests := []struct {
		name string
		// setup brings a fresh job to the step's state and returns the step.
		setup func(t *testing.T, e *lcEnv) func() error
		want  refusal // of the second call
	}{
		{"succeed", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			return e.succeed(j, e.start(t, j))
		}, stateErr(jobs.Succeeded)},
		{"fail with attempt", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			return e.fail(j, e.start(t, j))
		}, stateErr(jobs.Failed)},
		{"fail queued (dispatch 0)", func(t *testing.T, e *lcEnv) func() error {
			return e.fail(e.admit(t), 0)
		}, stateErr(jobs.Failed)},
		{"retry", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			return e.retry(j, e.start(t, j), false)
		}, sentinel(scheduler.ErrAttemptEnded)},
		{"retry infra", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			return e.retry(j, e.start(t, j), true)
		}, sentinel(scheduler.ErrAttemptEnded)},
		{"stop after cancel of running job", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			d := e.start(t, j)
			if from := e.cancel(t, j); from != jobs.Running {
				t.Fatalf("canceled from %s, want running", from)
			}
			return e.stop(e.get(t, j.ID), d)
		}, sentinel(scheduler.ErrAttemptEnded)},
		{"cancel queued", func(t *testing.T, e *lcEnv) func() error {
			return e.cancelStep(e.admit(t))
		}, stateErr(jobs.Canceled)},
		{"cancel dispatched, not started", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			e.dispatch(t, j)
			return e.cancelStep(j)
		}, stateErr(jobs.Canceled)},
		{"cancel running", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			e.start(t, j)
			return e.cancelStep(j)
		}, stateErr(jobs.Canceled)},
		{"expire", func(t *testing.T, e *lcEnv) func() error {
			return e.expire(e.admit(t))
		}, stateErr(jobs.Expired)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newLifecycleEnv(t)
			step := tc.setup(t, e)
			if err := step(); err != nil {
				t.Fatalf("first call: %v", err)
			}
			refusedChangesNothing(t, e, step, tc.want)
		})
	}
}

// A step whose job changed meanwhile (canceled, dispatched again, ended) is
// refused with no partial effect.
func TestLifecycleStaleTransitionChangesNothing(t *testing.T) {
	// redispatch starts job j, lets its lease expire without a heartbeat and
	// dispatches it again: it returns the first dispatch and the new one.
	redispatch := func(t *testing.T, e *lcEnv, j *jobs.Job) (old, cur int) {
		old = e.start(t, j)
		e.clk.Advance(lcLease + time.Second)
		// The first round to find the lease past its time gives it a grace;
		// the next one after the grace takes it back.
		if r, err := e.s.Dispatch(context.Background(), e.g, 10); err != nil || len(r.Jobs) != 0 {
			t.Fatalf("the round that finds the lease past its time: %+v, %v; want a grace, no dispatch", r, err)
		}
		e.clk.Advance(lcLease)
		cur = e.dispatch(t, j)
		if cur != old+1 {
			t.Fatalf("dispatched again as %d, want %d", cur, old+1)
		}
		return old, cur
	}
	tests := []struct {
		name  string
		setup func(t *testing.T, e *lcEnv) func() error
		want  refusal
	}{
		{"succeed after cancel of running job", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			d := e.start(t, j)
			e.cancel(t, j)
			return e.succeed(j, d)
		}, stateErr(jobs.Canceled)},
		{"succeed after cancel of queued job", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			e.cancel(t, j)
			return e.succeed(j, 1)
		}, stateErr(jobs.Canceled)},
		{"retry after dispatched again", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			old, _ := redispatch(t, e, j)
			return e.retry(j, old, false)
		}, sentinel(scheduler.ErrSuperseded)},
		{"retry infra after dispatched again", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			old, _ := redispatch(t, e, j)
			return e.retry(j, old, true)
		}, sentinel(scheduler.ErrSuperseded)},
		{"succeed after dispatched again", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			old, _ := redispatch(t, e, j)
			return e.succeed(j, old)
		}, sentinel(scheduler.ErrSuperseded)},
		{"succeed after dispatched and started again", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			old, cur := redispatch(t, e, j)
			if err := e.startStep(j, cur)(); err != nil {
				t.Fatal(err)
			}
			return e.succeed(j, old)
		}, sentinel(scheduler.ErrSuperseded)},
		{"fail after dispatched again", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			old, _ := redispatch(t, e, j)
			return e.fail(j, old)
		}, sentinel(scheduler.ErrSuperseded)},
		{"start after dispatched again", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			old, _ := redispatch(t, e, j)
			return e.startStep(j, old)
		}, sentinel(scheduler.ErrSuperseded)},
		{"start twice for one dispatch", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			return e.startStep(j, e.start(t, j))
		}, sentinel(scheduler.ErrAttemptRunning)},
		{"start after cancel of queued job", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			d := e.dispatch(t, j)
			e.cancel(t, j)
			return e.startStep(j, d)
		}, stateErr(jobs.Canceled)},
		{"expire running job", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			e.start(t, j)
			return e.expire(j)
		}, stateErr(jobs.Running)},
		{"expire after succeed", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			if err := e.succeed(j, e.start(t, j))(); err != nil {
				t.Fatal(err)
			}
			return e.expire(j)
		}, stateErr(jobs.Succeeded)},
		{"fail after retry of the same attempt", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			d := e.start(t, j)
			if err := e.retry(j, d, false)(); err != nil {
				t.Fatal(err)
			}
			return e.fail(j, d)
		}, sentinel(scheduler.ErrAttemptEnded)},
		{"succeed after retry of the same attempt", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			d := e.start(t, j)
			if err := e.retry(j, d, false)(); err != nil {
				t.Fatal(err)
			}
			return e.succeed(j, d)
		}, sentinel(scheduler.ErrAttemptEnded)},
		{"start after retry of the same attempt", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			d := e.start(t, j)
			if err := e.retry(j, d, false)(); err != nil {
				t.Fatal(err)
			}
			return func() error {
				_, err := e.s.Start(context.Background(), e.attempt(j, d), e.clk.Now())
				return err
			}
		}, sentinel(scheduler.ErrAttemptEnded)},
		{"retry after fail", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			d := e.start(t, j)
			if err := e.fail(j, d)(); err != nil {
				t.Fatal(err)
			}
			return e.retry(j, d, true)
		}, stateErr(jobs.Failed)},
		{"fail queued after succeed", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			if err := e.succeed(j, e.start(t, j))(); err != nil {
				t.Fatal(err)
			}
			return e.fail(j, 0)
		}, stateErr(jobs.Succeeded)},
		{"cancel after succeed", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			if err := e.succeed(j, e.start(t, j))(); err != nil {
				t.Fatal(err)
			}
			return e.cancelStep(j)
		}, stateErr(jobs.Succeeded)},
		{"cancel after expire", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			if err := e.expire(j)(); err != nil {
				t.Fatal(err)
			}
			return e.cancelStep(j)
		}, stateErr(jobs.Expired)},
		{"stop of a job still running", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			d := e.start(t, j)
			c := *e.get(t, j.ID)
			c.Status = jobs.Canceled // as a worker that believed it canceled
			return e.stop(&c, d)
		}, stateErr(jobs.Running)},
		{"stop after succeed", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			d := e.start(t, j)
			if err := e.succeed(j, d)(); err != nil {
				t.Fatal(err)
			}
			c := *e.get(t, j.ID)
			c.Status = jobs.Canceled
			return e.stop(&c, d)
		}, stateErr(jobs.Succeeded)},
		{"succeed of a missing job", func(t *testing.T, e *lcEnv) func() error {
			j := e.admit(t)
			c := *j
			c.ID = jobs.NewID(e.g.Name)
			return e.succeed(&c, 1)
		}, sentinel(jobs.ErrNotFound)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newLifecycleEnv(t)
			step := tc.setup(t, e)
			refusedChangesNothing(t, e, step, tc.want)
		})
	}
}

// TestWaitReplicasCoversStart: with redis.wait_replicas, admission, an
// attempt's start and the job's end each WAIT for a replica (here there is
// none, so each WAIT comes back short and is counted), and the steps in
// between do not. The start matters as much as the 202: a dispatch the
// promoted replica never heard of hands the running job to a second worker,
// and its answer is bought twice.
func TestWaitReplicasCoversStart(t *testing.T) {
	e := newLifecycleEnv(t)
	w := redisconn.NewWaiter(1, 20*time.Millisecond, slog.New(slog.NewTextHandler(io.Discard, nil)))
	e.s = scheduler.New(e.rdb, e.store, scheduler.Options{Clock: e.clk.Now, LeaseTTL: lcLease, Wait: w})
	want := func(step string, admit, start, end int64) {
		t.Helper()
		got := [3]int64{w.Short("admit"), w.Short("start"), w.Short("end")}
		if got != [3]int64{admit, start, end} {
			t.Errorf("after %s: short WAITs admit/start/end = %v, want %v", step, got, [3]int64{admit, start, end})
		}
	}
	j := e.admit(t)
	want("admission", 1, 0, 0)
	d := e.dispatch(t, j)
	want("dispatch", 1, 0, 0)
	if _, err := e.s.Start(context.Background(), e.attempt(j, d), e.clk.Now()); err != nil {
		t.Fatalf("start: %v", err)
	}
	want("start", 1, 1, 0)
	if err := e.succeed(j, d)(); err != nil {
		t.Fatalf("succeed: %v", err)
	}
	want("success", 1, 1, 1)
}
