package scheduler

import (
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/internal/rkeys"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/redisconn"
)

// A job's life after admission is a handful of transitions, each one call
// of lua/lifecycle.lua: the record, the owner's counts, the fair queue, the
// limiter reservation and lease, the quota reservation, the usage statistics
// and the event change together or not at all. The calls here build that
// script's plan; their errors are the sentinels below, jobs.ErrNotFound, or
// a *jobs.StateError naming the status that refused the change.

var (
	//go:embed lua/lifecycle.lua
	lifecycleSrc    string
	lifecycleScript = redis.NewScript(prelude + lifecycleSrc)
)

// Errors of the lifecycle calls.
var (
	// ErrSuperseded: the job was dispatched again since this attempt's
	// dispatch (its lease was found expired); the attempt may no longer
	// write anything.
	ErrSuperseded = errors.New("scheduler: the job was dispatched again")
	// ErrAttemptEnded: the attempt was ended already (a repeated call).
	ErrAttemptEnded = errors.New("scheduler: the attempt has already ended")
	// ErrAttemptRunning: this dispatch's attempt is running already (a task
	// delivered twice).
	ErrAttemptRunning = errors.New("scheduler: the attempt is already running")
)

// CancelChannel is where a cancel of a job whose upstream call is running
// is announced (payload: the job id); the worker running it stops the call.
const CancelChannel = rkeys.Cancel

// plan is lua/lifecycle.lua's plan (see its header).
type plan struct {
	ID       string        `json:"id"`
	From     []jobs.Status `json:"from"`
	To       jobs.Status   `json:"to"`
	Dispatch int           `json:"dispatch,omitempty"`
	Open     int           `json:"open,omitempty"`
	Close    int           `json:"close,omitempty"`
	Salvage  bool          `json:"salvage,omitempty"`
	Event    string        `json:"event,omitempty"`
	Channel  string        `json:"channel"`
	TTL      int           `json:"ttl"`
	MaxLen   int           `json:"maxlen"`
	Used     [3]int        `json:"used"`
	Dur      int64         `json:"dur,omitempty"`
	Lim      [4]int64      `json:"lim"`
	RPH      int           `json:"-"` // the user's quotas, for giving back the hold
	TPH      int           `json:"-"`
	Requeue  *int64        `json:"requeue,omitempty"`
	Tallies  []tally       `json:"tallies,omitempty"`
	Wake     string        `json:"wake"`
	Moved    string        `json:"moved"`
	Cancel   string        `json:"cancel,omitempty"`
	Health   *health       `json:"health,omitempty"`
	Deadline int64         `json:"deadline,omitempty"`
}

// health is the group's outage rule (config.ModelGroup's outage fields).
type health struct {
	After     int     `json:"after"`
	Window    int64   `json:"window"`
	ProbeMin  int64   `json:"probe_min"`
	ProbeMax  int64   `json:"probe_max"`
	MaxOutage int64   `json:"max_outage"`
	Jitter    float64 `json:"jitter"`
}

type tally struct {
	Key    string `json:"k"`
	Field  string `json:"f"`
	Sorted bool   `json:"z"`
	By     int64  `json:"n"`
	TTL    int64  `json:"t"`
}

// step is one lifecycle call's outcome.
type step struct {
	EventID  string
	Attempts int
	// Limiter and Quota: the reservations it closed.
	Limiter, Quota bool
	From           jobs.Status // the status before the step
	// Health is the group's health after the step: HealthEntered (the step
	// began an outage), HealthDown, or "" (healthy).
	Health string
}

// The group's health after a step.
const (
	HealthEntered = "entered"
	HealthDown    = "down"
)

// apply runs one lifecycle step on job j of group g.
func (s *Scheduler) apply(ctx context.Context, g *config.ModelGroup, j *jobs.Job, p plan, data any, fields ...string) (step, error) {
	p.ID = j.ID
	p.Channel = jobs.Channel(j.ID)
	p.TTL, p.MaxLen = s.store.TTLSeconds(), s.store.MaxEvents()
	p.Lim = [4]int64{int64(g.RPM), int64(g.InputTPM), int64(g.OutputTPM), g.Burst.Milliseconds()}
	p.Wake, p.Moved = wakeChannel(g.Name), MovedChannel(g.Name)
	pb, err := json.Marshal(p)
	if err != nil {
		return step{}, err
	}
	db := []byte("{}")
	switch d := data.(type) {
	case nil:
	case json.RawMessage:
		db = d
	default:
		if db, err = json.Marshal(d); err != nil {
			return step{}, err
		}
	}
	// A job's end (succeeded, failed, expired, canceled) is followed by
	// WAIT (Options.Wait), as its admission was, and so is an attempt's
	// start: the worker calls the upstream only once a replica knows the
	// job was dispatched to it, so a failover cannot hand a promoted
	// replica a job still queued whose answer is being bought. The steps
	// between are not.
	var w *redisconn.Waiter
	what := "end"
	switch {
	case p.To.Terminal() && p.Event != "":
		w = s.wait
	case p.Event == "started":
		w, what = s.wait, "start"
	}
	out, err := runScript[lifecycleOut](ctx, s.rdb, w, what, lifecycleScript,
		lifecycleIn{Now: s.now(), Group: g.Name, Job: j, Plan: pb, Data: db, Fields: fields})
	if err != nil {
		return step{}, lifecycleError(j.ID, err)
	}
	st := step{EventID: out.Event, Attempts: out.Attempts, Limiter: out.Limiter, Quota: out.Quota, From: out.From, Health: out.Health}
	if held := out.Hold.hold(); st.Quota && held.any() {
		u := Used{Requests: p.Used[0], Input: p.Used[1], Output: p.Used[2]}
		s.giveQuota(ctx, j, held, u, config.UserPolicy{RequestsPerHour: p.RPH, TokensPerHour: p.TPH})
	}
	return st, nil
}

// lifecycleIn is lua/lifecycle.lua's input.
type lifecycleIn struct {
	Now    int64
	Group  string
	Job    *jobs.Job
	Plan   []byte   // the plan, JSON
	Data   []byte   // the event's data, JSON
	Fields []string // field, value pairs to set on the record
}

func (in lifecycleIn) call() ([]string, []any) {
	j, k := in.Job, keys{in.Group}
	args := make([]any, 0, 3+len(in.Fields))
	args = append(args, in.Now, in.Plan, in.Data)
	for _, f := range in.Fields {
		args = append(args, f)
	}
	return []string{
		jobs.Key(j.ID), jobs.EventsKey(j.ID), jobs.CountsKey(in.Group, j.Tenant, j.UserID), jobs.WaitingUsersKey(in.Group),
		k.lim(), k.reservations(), k.leases(), k.rate(),
		k.order(), k.costs(), k.totals(), k.deadlines(), k.delayed(), k.delayedTags(), k.expiring(), k.live(),
		k.batched(),
	}, args
}

// lifecycleOut is lua/lifecycle.lua's reply.
type lifecycleOut struct {
	Event    string      `redis:"event"` // "": no event
	Attempts int         `redis:"attempts"`
	Limiter  bool        `redis:"limiter"`
	Quota    bool        `redis:"quota"`
	From     jobs.Status `redis:"from"`
	Health   string      `redis:"health"`
	Hold     holdOut     `redis:"hold"`
}

func lifecycleError(id string, err error) error {
	// Redis 7 prefixes a one-word script error with "ERR ".
	msg := strings.TrimPrefix(err.Error(), "ERR ")
	switch {
	case msg == "NOTFOUND":
		return jobs.ErrNotFound
	case strings.HasPrefix(msg, "STATE "):
		return &jobs.StateError{Current: jobs.Status(strings.TrimPrefix(msg, "STATE "))}
	case msg == "SUPERSEDED":
		return ErrSuperseded
	case msg == "NOATTEMPT":
		return ErrAttemptEnded
	case msg == "RUNNING":
		return ErrAttemptRunning
	}
	return fmt.Errorf("scheduler: %s: %w", id, err)
}

func tallies(ts []jobs.Tally) []tally {
	out := make([]tally, len(ts))
	for i, t := range ts {
		out[i] = tally{Key: t.Key, Field: t.Field, Sorted: t.Sorted, By: t.By, TTL: int64(t.TTL / time.Second)}
	}
	return out
}

func used(u Used) [3]int { return [3]int{u.Requests, u.Input, u.Output} }

// Attempt names one dispatched upstream attempt of a job.
type Attempt struct {
	Group    *config.ModelGroup
	Job      *jobs.Job
	Dispatch int // the dispatch that handed the job to this worker
}

// Start opens the attempt: the job is running, its attempt count goes up
// and its followers get `started`. It returns the attempt number. A job
// whose previous attempt was never ended (its worker died) first gets a
// `retrying` event with reason worker_lost.
func (s *Scheduler) Start(ctx context.Context, a Attempt, at time.Time) (int, error) {
	st, err := s.apply(ctx, a.Group, a.Job, plan{
		From: []jobs.Status{jobs.Queued, jobs.Running}, To: jobs.Running,
		Dispatch: a.Dispatch, Open: a.Dispatch, Event: "started",
	}, json.RawMessage(`{"attempt":"__ATTEMPTS__"}`), "?started_at", jobs.MillisString(at))
	return st.Attempts, err
}

// Success is an attempt's answer.
type Success struct {
	Attempt
	Result   json.RawMessage // the upstream Message
	Text     string
	Usage    jobs.Usage
	Used     Used          // what the limiter counts of it
	Duration time.Duration // of the call
	At       time.Time     // finished at
	Policy   config.UserPolicy
	Tallies  []jobs.Tally // usage statistics of the answer
}

// Succeed ends the attempt and the job with its answer, settling both
// reservations with what the upstream used. It succeeds even when a
// dispatcher found the attempt's lease expired meanwhile (Redis was away)
// and put the job back in line, as long as the job was not dispatched
// again: an answer in hand is never thrown away to be bought twice.
func (s *Scheduler) Succeed(ctx context.Context, r Success) error {
	j := *r.Job
	ub, err := json.Marshal(r.Usage)
	if err != nil {
		return err
	}
	u := r.Usage
	j.Status, j.Result, j.Text, j.Usage, j.FinishedAt = jobs.Succeeded, r.Result, r.Text, &u, r.At
	_, err = s.apply(ctx, r.Group, r.Job, plan{
		From: []jobs.Status{jobs.Running}, To: jobs.Succeeded, Dispatch: r.Dispatch, Close: r.Dispatch, Salvage: true,
		Event: "succeeded", Used: used(r.Used), Dur: r.Duration.Milliseconds(),
		RPH: r.Policy.RequestsPerHour, TPH: r.Policy.TokensPerHour, Tallies: tallies(r.Tallies),
	}, j.View(), "result", string(r.Result), "text", r.Text, "usage", string(ub), "finished_at", jobs.MillisString(r.At))
	return err
}

// Failure ends a job as failed.
type Failure struct {
	Attempt // Dispatch 0: no attempt of the job is running
	Error   jobs.Error
	Used    Used // what the upstream counted of the attempt
	At      time.Time
	Policy  config.UserPolicy
	Tallies []jobs.Tally
}

// Fail ends the job as failed (and its attempt, when Dispatch > 0),
// settling its reservations.
func (s *Scheduler) Fail(ctx context.Context, f Failure) error {
	eb, err := json.Marshal(f.Error)
	if err != nil {
		return err
	}
	p := plan{From: []jobs.Status{jobs.Running}, To: jobs.Failed, Event: "failed", Used: used(f.Used),
		RPH: f.Policy.RequestsPerHour, TPH: f.Policy.TokensPerHour, Tallies: tallies(f.Tallies)}
	if f.Dispatch > 0 {
		p.Dispatch, p.Close = f.Dispatch, f.Dispatch
	} else {
		p.From = []jobs.Status{jobs.Queued, jobs.Running}
	}
	_, err = s.apply(ctx, f.Group, f.Job, p, map[string]any{"error": f.Error},
		"error", string(eb), "finished_at", jobs.MillisString(f.At))
	return err
}

// Retry is an attempt that ended without an answer and will run again.
type Retry struct {
	Attempt
	Used   Used   // what the upstream counted of the attempt
	Reason string // the `retrying` event's reason
	Delay  time.Duration
	// Failures, when > 0, is the job's new count of failed attempts (0
	// leaves it as it is).
	Failures int
	// Infra: the attempt failed for a reason of the upstream's own; it
	// counts toward the group's outage rule, and while the group is in
	// outage the job waits (at the front of its lane) with no delay of its
	// own until the upstream is back, or until Deadline (if not zero).
	Infra    bool
	Deadline time.Time
	Tallies  []jobs.Tally
	Fields   []string // more field, value pairs to set on the record
}

// Retry ends the attempt, settles its limiter reservation with what it
// used, logs `retrying` and puts the job back at its place in its lane, due
// after Delay. It returns the group's health after the step.
func (s *Scheduler) Retry(ctx context.Context, r Retry) (string, error) {
	delay := r.Delay.Milliseconds()
	fields := r.Fields
	if r.Failures > 0 {
		fields = append(fields, "failures", fmt.Sprint(r.Failures))
	}
	p := plan{
		From: []jobs.Status{jobs.Running}, To: jobs.Running, Dispatch: r.Dispatch, Close: r.Dispatch,
		Event: "retrying", Used: used(r.Used), Requeue: &delay, Tallies: tallies(r.Tallies),
	}
	if r.Infra {
		g := r.Group
		p.Health = s.health(g)
		if !r.Deadline.IsZero() {
			p.Deadline = r.Deadline.UnixMilli()
		}
	}
	st, err := s.apply(ctx, r.Group, r.Job, p, json.RawMessage(fmt.Sprintf(`{"attempt":"__ATTEMPTS__","reason":%q,"retry_in_seconds":%s}`,
		r.Reason, jsonSeconds(r.Delay))), fields...)
	return st.Health, err
}

// health is g's outage rule, with a fresh jitter.
func (s *Scheduler) health(g *config.ModelGroup) *health {
	return &health{After: g.OutageFailures, Window: g.OutageWindow.Milliseconds(),
		ProbeMin: g.ProbeInterval.Milliseconds(), ProbeMax: g.ProbeIntervalMax.Milliseconds(),
		MaxOutage: s.maxOutage.Milliseconds(), Jitter: rand.Float64()}
}

var (
	//go:embed lua/probe.lua
	probeSrc    string
	probeScript = redis.NewScript(prelude + probeSrc)
)

// ProbeFailed reports that a jobless probe (Dispatch's State Probe) found
// the upstream still failing: the next probe goes after a longer wait. (A
// probe the upstream answered is reported with Observe, answered.)
func (s *Scheduler) ProbeFailed(ctx context.Context, g *config.ModelGroup) error {
	h, err := json.Marshal(s.health(g))
	if err != nil {
		return err
	}
	if _, err := runInt(ctx, s.rdb, probeScript, probeIn{Now: s.now(), Group: g.Name, Health: h}); err != nil {
		return fmt.Errorf("scheduler: probe failed %s: %w", g.Name, err)
	}
	return nil
}

// jsonSeconds is d in seconds, to the millisecond.
func jsonSeconds(d time.Duration) string {
	return fmt.Sprint(math.Round(d.Seconds()*1000) / 1000)
}

// Stopped ends the attempt of a job that ended (canceled) while its call
// ran, settling both reservations with what the call used. Job.Status is
// the status it ended with.
type Stopped struct {
	Attempt
	Used    Used
	Policy  config.UserPolicy
	Tallies []jobs.Tally
}

// Stop settles a canceled job's attempt (see Stopped).
func (s *Scheduler) Stop(ctx context.Context, r Stopped) error {
	if !r.Job.Status.Terminal() {
		return fmt.Errorf("scheduler: stop %s: status %q is not an end", r.Job.ID, r.Job.Status)
	}
	_, err := s.apply(ctx, r.Group, r.Job, plan{
		From: []jobs.Status{r.Job.Status}, To: r.Job.Status, Close: r.Dispatch, Used: used(r.Used),
		RPH: r.Policy.RequestsPerHour, TPH: r.Policy.TokensPerHour, Tallies: tallies(r.Tallies),
	}, nil)
	return err
}

// Cancel ends a job in one of the statuses from (queued or running when
// none is given) as canceled, and returns the status it had. A job with no
// call running leaves its lane and gets both reservations back at once; a
// running call is told to stop, and its worker settles what it used (Stop).
func (s *Scheduler) Cancel(ctx context.Context, g *config.ModelGroup, j *jobs.Job, at time.Time, policy config.UserPolicy, from ...jobs.Status) (jobs.Status, error) {
	if len(from) == 0 {
		from = []jobs.Status{jobs.Queued, jobs.Running}
	}
	st, err := s.apply(ctx, g, j, plan{
		From: from, To: jobs.Canceled, Event: "canceled",
		RPH: policy.RequestsPerHour, TPH: policy.TokensPerHour, Cancel: CancelChannel,
	}, nil, "finished_at", jobs.MillisString(at))
	return st.From, err
}

// Expire ends a queued job whose deadline passed before it could start;
// nothing was sent upstream, so both reservations are refunded.
func (s *Scheduler) Expire(ctx context.Context, g *config.ModelGroup, j *jobs.Job, at time.Time, policy config.UserPolicy) error {
	_, err := s.apply(ctx, g, j, plan{
		From: []jobs.Status{jobs.Queued}, To: jobs.Expired, Event: "expired",
		RPH: policy.RequestsPerHour, TPH: policy.TokensPerHour,
	}, nil, "finished_at", jobs.MillisString(at))
	return err
}
