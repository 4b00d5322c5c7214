// Package worker runs jobs: the asynq handler that makes one upstream call
// for a dispatched job, with the scheduler's reservation and concurrency
// lease in hand; it streams the text into the job's event log, stores the
// result, settles the reservation with the real usage, and decides what a
// failure means (wait, retry later, or give up). Retry policy lives here.
package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/estimate"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/metrics"
	"github.com/sluice-dev/sluice/scheduler"
	"github.com/sluice-dev/sluice/tasks"
	"github.com/sluice-dev/sluice/upstream"
	"github.com/sluice-dev/sluice/usage"
)

// Deps are what a Worker needs.
type Deps struct {
	Config    *config.Config
	Redis     redis.UniversalClient
	Store     *jobs.Store
	Scheduler *scheduler.Scheduler
	Estimator *estimate.Calibrator
	Upstream  *upstream.Client
	Metrics   *metrics.Metrics // nil = none
	Usage     *usage.Recorder  // nil = no usage statistics
	Logger    *slog.Logger
	Clock     func() time.Time // nil = time.Now
}

// Worker is an asynq server with one queue per model group.
type Worker struct {
	d        Deps
	srv      *asynq.Server
	aq       *asynq.Client
	disp     *scheduler.Dispatcher
	dispWG   sync.WaitGroup
	dispStop context.CancelFunc
	base     context.Context
	cancel   context.CancelFunc
	groups   map[string]*config.ModelGroup
	tenants  map[string]*config.Tenant

	// running maps a job id to the cancel func of its call in this process,
	// so a cancel published by an api process stops it at once.
	running sync.Map

	stopOnce sync.Once
}

// CancelChannel is where api processes announce canceled running jobs.
const CancelChannel = "sluice:cancel"

// New builds a Worker; Start runs it.
func New(d Deps) *Worker {
	if d.Clock == nil {
		d.Clock = time.Now
	}
	cfg := d.Config
	w := &Worker{d: d, groups: map[string]*config.ModelGroup{}, tenants: map[string]*config.Tenant{}}
	for i := range cfg.Tenants {
		w.tenants[cfg.Tenants[i].Name] = &cfg.Tenants[i]
	}
	w.base, w.cancel = context.WithCancel(context.Background())
	queues := map[string]int{}
	concurrency := 0
	for i := range cfg.ModelGroups {
		g := &cfg.ModelGroups[i]
		w.groups[g.Name] = g
		queues[tasks.Queue(g.Name)] = 1
		// The fleet-wide cap is the scheduler's leases; a process can run
		// every lease of every group, so a dispatched job never waits for a
		// worker slot.
		concurrency += g.MaxConcurrency
	}
	w.srv = asynq.NewServerFromRedisClient(d.Redis, asynq.Config{
		Concurrency:       concurrency,
		Queues:            queues,
		BaseContext:       func() context.Context { return w.base },
		TaskCheckInterval: cfg.Worker.TaskCheckInterval,
		ShutdownTimeout:   cfg.Worker.ShutdownTimeout,
		Logger:            asynqLogger{d.Logger.With("component", "asynq")},
		LogLevel:          asynq.WarnLevel,
		ErrorHandler: asynq.ErrorHandlerFunc(func(ctx context.Context, t *asynq.Task, err error) {
			id, _ := asynq.GetTaskID(ctx)
			d.Logger.Warn("task failed inside sluice; asynq retries it", "task_id", id, "err", err)
		}),
	})
	w.aq = asynq.NewClientFromRedisClient(d.Redis)
	w.disp = scheduler.NewDispatcher(scheduler.DispatcherDeps{
		Scheduler: d.Scheduler, Redis: d.Redis, Groups: cfg.ModelGroups, Enqueuer: w.aq,
		Task: tasks.RunJobOptions{
			MaxRetry:  3,
			Timeout:   cfg.Upstream.AttemptTimeout + time.Minute, // the worker's own attempt timeout fires first
			Retention: time.Hour,                                 // finished tasks stay visible in asynqmon
		},
		Logger:       d.Logger.With("component", "dispatcher"),
		Expire:       w.expireQueued,
		OnDispatched: d.Metrics.Dispatched,
	})
	return w
}

// policy is the quota policy of a job's user.
func (w *Worker) policy(j *jobs.Job) config.UserPolicy {
	if t, ok := w.tenants[j.Tenant]; ok {
		return t.Policy(j.UserID)
	}
	return config.UserPolicy{}
}

// Handler is the worker's task mux: every task type it runs.
func (w *Worker) Handler() asynq.Handler {
	mux := asynq.NewServeMux()
	mux.HandleFunc(tasks.TypeRunJob, w.RunJob)
	return mux
}

// Start begins processing and dispatching; it returns at once.
func (w *Worker) Start() error {
	if err := w.srv.Start(w.Handler()); err != nil {
		return fmt.Errorf("worker: start: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	w.dispStop = cancel
	w.dispWG.Add(2)
	go func() {
		defer w.dispWG.Done()
		_ = w.disp.Run(ctx)
	}()
	go func() {
		defer w.dispWG.Done()
		w.listenCancels(ctx)
	}()
	return nil
}

// listenCancels stops this process's call of a job canceled elsewhere.
func (w *Worker) listenCancels(ctx context.Context) {
	ps := w.d.Redis.Subscribe(ctx, CancelChannel)
	defer ps.Close()
	ch := ps.Channel(redis.WithChannelHealthCheckInterval(10 * time.Second))
	for {
		select {
		case <-ctx.Done():
			return
		case m, ok := <-ch:
			if !ok {
				return
			}
			if c, ok := w.running.Load(m.Payload); ok {
				c.(context.CancelFunc)()
			}
		}
	}
}

// Shutdown stops taking tasks, lets running calls finish within the
// configured shutdown timeout, then stops them: they are handed back to the
// fair queue (first in line) and run again elsewhere, as a new attempt.
func (w *Worker) Shutdown() {
	w.stopOnce.Do(func() {
		if w.dispStop != nil {
			w.dispStop() // dispatch no more: other processes' dispatchers take over
			w.dispWG.Wait()
		}
		// Stop handlers a little before asynq gives up on them, so each hands
		// its job back itself.
		grace := w.d.Config.Worker.ShutdownTimeout
		t := time.AfterFunc(grace*9/10, w.cancel)
		defer t.Stop()
		w.srv.Shutdown()
		w.cancel()
		_ = w.aq.Close()
	})
}

// attempt is one run of a dispatched job.
type attempt struct {
	job      *jobs.Job
	group    *config.ModelGroup
	dispatch int
	log      *slog.Logger
}

// RunJob is the handler of tasks.TypeRunJob.
func (w *Worker) RunJob(ctx context.Context, t *asynq.Task) error {
	p, err := tasks.ParseRunJob(t)
	if err != nil {
		return fmt.Errorf("%v: %w", err, asynq.SkipRetry)
	}
	log := w.d.Logger.With("job_id", p.JobID, "group", p.Group, "dispatch", p.Dispatch)
	g, ok := w.groups[p.Group]
	if !ok {
		log.Error("task for a model group that is not configured here; dropping it")
		return fmt.Errorf("unknown group %q: %w", p.Group, asynq.SkipRetry)
	}
	job, err := w.d.Store.Get(ctx, p.JobID)
	if errors.Is(err, jobs.ErrNotFound) {
		log.Warn("job record is gone (expired); returning its reservation")
		w.settle(ctx, &attempt{job: &jobs.Job{ID: p.JobID}, group: g, log: log}, scheduler.Used{}, 0, false)
		return nil
	}
	if err != nil {
		return err
	}
	a := &attempt{job: job, group: g, dispatch: p.Dispatch,
		log: log.With("tenant", job.Tenant, "user_id", job.UserID)}
	switch {
	case job.Dispatch != p.Dispatch:
		return nil // superseded: the job was queued again and handed to another task
	case job.Status.Terminal():
		// Canceled or expired after dispatch: the upstream was never paid.
		w.settle(ctx, a, scheduler.Used{}, 0, true)
		return nil
	case job.Status == jobs.Queued && !job.DeadlineAt.IsZero() && w.d.Clock().After(job.DeadlineAt):
		w.expire(ctx, a)
		return nil
	}
	return w.run(ctx, a)
}

func (w *Worker) run(ctx context.Context, a *attempt) error {
	job, g := a.job, a.group
	held, err := w.d.Scheduler.Renew(ctx, g.Name, job.ID)
	if err != nil {
		return err
	}
	if !held {
		a.log.Info("lease expired before the call started; the job was queued again")
		return nil
	}
	callCtx, cancelCall := context.WithCancel(ctx)
	defer cancelCall()
	w.running.Store(job.ID, cancelCall)
	defer w.running.Delete(job.ID)
	var lost atomic.Bool
	var hb sync.WaitGroup
	hb.Add(1)
	go func() {
		defer hb.Done()
		w.heartbeat(callCtx, a, func() { lost.Store(true); cancelCall() })
	}()
	defer hb.Wait()

	first := job.StartedAt.IsZero()
	if first {
		job.StartedAt = w.now() // the first attempt's start is the job's
	}
	n, err := w.d.Store.Apply(ctx, job, jobs.Transition{
		From: []jobs.Status{jobs.Queued, jobs.Running}, To: jobs.Running, CountAttempt: true,
		Dispatch:      a.dispatch,
		SetIfAbsent:   map[string]string{"started_at": jobs.MillisString(job.StartedAt)},
		Event:         "started",
		EventDataJSON: []byte(`{"attempt":"__ATTEMPTS__"}`),
	})
	var se *jobs.StateError
	if errors.As(err, &se) || errors.Is(err, jobs.ErrNotFound) {
		cancelCall()
		w.settle(ctx, a, scheduler.Used{}, 0, true) // canceled meanwhile: never reached upstream
		return nil
	}
	if err != nil {
		return err
	}
	job.Attempts = n
	a.log = a.log.With("attempt", n)
	if first {
		w.d.Metrics.Waited(g.Name, job.StartedAt.Sub(job.CreatedAt))
	}

	body, err := upstreamBody(job)
	if err != nil {
		cancelCall()
		w.fail(ctx, a, scheduler.Used{}, &jobs.Error{Type: "invalid_request", Message: "This job's request could not be read: " + err.Error()})
		return nil
	}
	attemptCtx, cancelAttempt := context.WithTimeout(callCtx, w.d.Config.Upstream.AttemptTimeout)
	defer cancelAttempt()
	var appendErr error
	start := time.Now()
	call := w.d.Metrics.Call(g.Name)
	res, err := w.d.Upstream.Stream(attemptCtx, body, func(h http.Header) { w.observe(ctx, a, h) }, func(text string) {
		call.Text()
		if appendErr != nil {
			return
		}
		if _, appendErr = w.d.Store.Append(ctx, job.ID, jobs.Running, a.dispatch, "delta", map[string]string{"text": text}); appendErr != nil {
			cancelAttempt() // canceled by its user, or superseded: stop paying for output
		}
	})
	elapsed := time.Since(start)
	call.End(callStatus(err))
	cancelCall() // stop the heartbeat; the lease is released by settle or requeue
	if appendErr == nil && err != nil && callCtx.Err() != nil && ctx.Err() == nil && !lost.Load() {
		// Stopped from outside: a cancel published by an api process.
		if cur, gerr := w.d.Store.Get(ctx, job.ID); gerr == nil && cur.Status.Terminal() {
			appendErr = &jobs.StateError{Current: cur.Status}
		}
	}
	if appendErr != nil {
		if errors.As(appendErr, &se) {
			a.log.Info("job left running during the call; upstream call stopped", "status", se.Current)
			if se.Current != "superseded" {
				w.settle(ctx, a, partialUse(err, job), elapsed, true) // charged what it used
			}
			return nil
		}
		a.log.Error("could not log the answer's text; handing the job back", "err", appendErr)
		w.handBack(ctx, a)
		return nil
	}
	if err != nil {
		if lost.Load() {
			a.log.Warn("lease lost during the call (heartbeats failed); the job runs again elsewhere")
			return nil
		}
		return w.failedAttempt(ctx, a, err, elapsed)
	}
	return w.succeed(ctx, a, res, elapsed)
}

// tallies are the usage statistics a job that ends bumps with its
// transition (none without a recorder).
func (w *Worker) tallies(j *jobs.Job, ok bool, u jobs.Usage, now time.Time) []jobs.Tally {
	if w.d.Usage == nil {
		return nil
	}
	f := usage.Finished{Tenant: j.Tenant, UserID: j.UserID, Succeeded: ok, Usage: u, Latency: now.Sub(j.CreatedAt), Wait: -1, At: now}
	if !j.StartedAt.IsZero() {
		f.Wait = j.StartedAt.Sub(j.CreatedAt)
	}
	return w.d.Usage.Tallies(f)
}

// callStatus is the HTTP status an upstream call ended with, for metrics:
// 200 for an answer, the error's status, or 0 when there was none.
func callStatus(err error) int {
	if err == nil {
		return http.StatusOK
	}
	var ue *upstream.Error
	if errors.As(err, &ue) {
		return ue.Status
	}
	return 0
}

// heartbeat renews the job's lease every third of its TTL; onLost is called
// when the lease turns out to have expired (the job may be running again
// elsewhere).
func (w *Worker) heartbeat(ctx context.Context, a *attempt, onLost func()) {
	tick := time.NewTicker(w.d.Scheduler.LeaseTTL() / 3)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			ok, err := w.d.Scheduler.Renew(ctx, a.group.Name, a.job.ID)
			switch {
			case err != nil && ctx.Err() == nil:
				a.log.Warn("could not renew the job's lease", "err", err)
			case err == nil && !ok:
				onLost()
				return
			}
		}
	}
}

func (w *Worker) observe(ctx context.Context, a *attempt, h map[string][]string) {
	if err := w.d.Scheduler.Observe(context.WithoutCancel(ctx), a.group, h); err != nil {
		a.log.Warn("could not record rate-limit headers", "err", err)
	}
}

// now is the clock as job records keep it: UTC, whole milliseconds.
func (w *Worker) now() time.Time { return w.d.Clock().UTC().Truncate(time.Millisecond) }

// inputCounted is what the group's input limit counts of a usage.
func inputCounted(g *config.ModelGroup, u upstream.Usage) int {
	n := u.InputTokens + u.CacheCreationInputTokens
	if g.CountCacheReads {
		n += u.CacheReadInputTokens
	}
	return n
}

// partialUse is what a call stopped from our side had used: what the
// stream reported so far, or nothing when it had not started.
func partialUse(err error, j *jobs.Job) scheduler.Used {
	var ue *upstream.Error
	if !errors.As(err, &ue) || !ue.Started {
		if err == nil {
			return scheduler.Used{Requests: 1, Input: j.CostIn, Output: j.CostOut}
		}
		return scheduler.Used{Requests: 1, Input: j.CostIn}
	}
	in := ue.Partial.InputTokens + ue.Partial.CacheCreationInputTokens
	if in == 0 {
		in = j.CostIn
	}
	return scheduler.Used{Requests: 1, Input: in, Output: min(ue.Partial.OutputTokens, j.MaxTokens)}
}

func (w *Worker) succeed(ctx context.Context, a *attempt, res *upstream.Result, elapsed time.Duration) error {
	job, g := a.job, a.group
	now := w.now()
	usage := jobs.Usage(res.Usage)
	ub, _ := json.Marshal(usage)
	job.Status, job.Result, job.Text, job.Usage, job.FinishedAt = jobs.Succeeded, res.Message, res.Text, &usage, now
	view := job.View()
	_, err := w.d.Store.Apply(context.WithoutCancel(ctx), job, jobs.Transition{
		From: []jobs.Status{jobs.Running}, To: jobs.Succeeded, Dispatch: a.dispatch,
		Set: map[string]string{
			"result": string(res.Message), "text": res.Text, "usage": string(ub),
			"finished_at": jobs.MillisString(now),
		},
		Event: "succeeded", EventData: view,
		Tallies: w.tallies(job, true, usage, now),
	})
	var se *jobs.StateError
	if err != nil && !errors.As(err, &se) {
		return err
	}
	input := inputCounted(g, res.Usage)
	w.settle(ctx, a, scheduler.Used{Requests: 1, Input: input, Output: res.Usage.OutputTokens}, elapsed, true)
	if w.d.Estimator != nil {
		if err := w.d.Estimator.Observe(context.WithoutCancel(ctx), job.Model, estimate.Raw(job.Request), input); err != nil {
			a.log.Warn("could not update the token estimate", "err", err)
		}
	}
	if se != nil {
		a.log.Info("job finished upstream after leaving running; result not stored", "status", se.Current)
		return nil
	}
	w.d.Metrics.Finished(g.Name, string(jobs.Succeeded))
	w.d.Metrics.Tokens(g.Name, usage.InputTokens, usage.OutputTokens, usage.CacheReadInputTokens, usage.CacheCreationInputTokens)
	w.d.Metrics.Estimate(g.Name, input, job.CostIn)
	a.log.Info("job succeeded", "input_tokens", usage.InputTokens, "output_tokens", usage.OutputTokens, "seconds", math.Round(elapsed.Seconds()*1000)/1000)
	return nil
}

// settle closes the job's limiter reservation and, when final (the job
// has ended), its user's quota reservation, with what the upstream used.
func (w *Worker) settle(ctx context.Context, a *attempt, used scheduler.Used, elapsed time.Duration, final bool) {
	_, _, err := w.d.Scheduler.Settle(context.WithoutCancel(ctx), scheduler.Settlement{
		Group: a.group, Job: a.job, Used: used, Duration: elapsed, Final: final, Policy: w.policy(a.job),
	})
	if err != nil {
		a.log.Error("could not settle the job's reservation", "err", err)
	}
}

// handBack returns a job whose call was interrupted on our side (shutdown)
// to the front of its queue. Its reservation stays: the call may have
// reached the upstream, and the next dispatch reuses it.
func (w *Worker) handBack(ctx context.Context, a *attempt) {
	if err := w.d.Scheduler.Requeue(context.WithoutCancel(ctx), a.group, a.job, 0); err != nil {
		a.log.Error("could not hand the job back to the queue; its lease expiry will", "err", err)
		return
	}
	a.log.Info("call stopped by shutdown; job handed back to the queue")
}

func (w *Worker) expire(ctx context.Context, a *attempt) {
	_, err := w.d.Store.Apply(ctx, a.job, jobs.Transition{
		From: []jobs.Status{jobs.Queued}, To: jobs.Expired,
		Set:   map[string]string{"finished_at": jobs.MillisString(w.now())},
		Event: "expired", EventData: struct{}{},
	})
	var se *jobs.StateError
	if err != nil && !errors.As(err, &se) {
		a.log.Error("could not expire job", "err", err)
		return
	}
	w.settle(ctx, a, scheduler.Used{}, 0, true)
	w.d.Metrics.Finished(a.group.Name, string(jobs.Expired))
	a.log.Info("job expired before it could start; nothing was sent upstream")
}

// expireQueued expires a job whose deadline passed while it waited (the
// dispatcher found it).
func (w *Worker) expireQueued(ctx context.Context, g *config.ModelGroup, id string) error {
	job, err := w.d.Store.Get(ctx, id)
	if errors.Is(err, jobs.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	w.expire(ctx, &attempt{job: job, group: g, log: w.d.Logger.With("job_id", id, "group", g.Name, "tenant", job.Tenant, "user_id", job.UserID)})
	return nil
}

// fail ends the job as failed with a message for a person, and settles it
// with what the upstream used.
func (w *Worker) fail(ctx context.Context, a *attempt, used scheduler.Used, e *jobs.Error) {
	defer w.settle(ctx, a, used, 0, true)
	eb, _ := json.Marshal(e)
	now := w.now()
	_, err := w.d.Store.Apply(context.WithoutCancel(ctx), a.job, jobs.Transition{
		From: []jobs.Status{jobs.Queued, jobs.Running}, To: jobs.Failed, Dispatch: a.dispatch,
		Set:   map[string]string{"error": string(eb), "finished_at": jobs.MillisString(now)},
		Event: "failed", EventData: map[string]any{"error": e},
		Tallies: w.tallies(a.job, false, jobs.Usage{}, now),
	})
	if err != nil {
		var se *jobs.StateError
		if !errors.As(err, &se) {
			a.log.Error("could not record job failure", "err", err)
		}
		return
	}
	w.d.Metrics.Finished(a.group.Name, string(jobs.Failed))
	a.log.Warn("job failed", "error_type", e.Type)
}

// failedAttempt decides what an upstream failure means. Every outcome
// settles the attempt's reservation first (what the upstream counted), then
// either fails the job or queues it again at the front of its lane.
func (w *Worker) failedAttempt(ctx context.Context, a *attempt, err error, elapsed time.Duration) error {
	var ue *upstream.Error
	if !errors.As(err, &ue) {
		ue = &upstream.Error{Kind: upstream.KindRetryable, Message: err.Error(), Err: err}
	}
	if ue.Header != nil {
		w.observe(ctx, a, ue.Header)
	}
	if ue.Kind == upstream.KindCanceled {
		if ctx.Err() != nil {
			w.handBack(ctx, a) // the process is stopping
			return nil
		}
		ue = &upstream.Error{Kind: upstream.KindRetryable, Message: fmt.Sprintf("the upstream call took longer than %s", w.d.Config.Upstream.AttemptTimeout), Err: err}
	}
	job, g := a.job, a.group
	a.log = a.log.With("upstream_status", ue.Status, "upstream_type", ue.Type, "request_id", ue.RequestID)
	if w.d.Usage != nil && (ue.Status == 429 || ue.Status == 529) {
		if uerr := w.d.Usage.Upstream(context.WithoutCancel(ctx), job.Tenant, ue.Status); uerr != nil {
			a.log.Warn("could not count the upstream's pushback in the usage statistics", "err", uerr)
		}
	}
	switch ue.Kind {
	case upstream.KindFatal, upstream.KindSpendLimit:
		// Refused before any work: nothing counted upstream.
		w.fail(ctx, a, scheduler.Used{}, jobError(ue))
		return nil
	case upstream.KindRateLimited:
		kind := scheduler.Pushback429
		if ue.Code == "ramp_limit_exceeded" {
			kind = scheduler.PushbackRamp
		}
		until, ferr := w.d.Scheduler.Freeze(context.WithoutCancel(ctx), g, kind, ue.RetryAfter)
		if ferr != nil {
			a.log.Error("could not freeze the group", "err", ferr)
		}
		a.log.Warn("upstream rate limit: group frozen", "until", until.UTC().Format(time.RFC3339Nano))
		w.settle(ctx, a, scheduler.Used{}, 0, false) // a 429 is not admitted
		return w.retry(ctx, a, ue, ue.RetryAfter, false)
	}
	// Transient: 529/5xx and broken connections before the answer are not
	// billed; a stream that broke after starting may have been.
	used := scheduler.Used{Requests: 1, Input: job.CostIn}
	if ue.Started {
		used = partialUse(ue, job)
	}
	if ue.Status == 529 || ue.Type == "overloaded_error" {
		if _, ferr := w.d.Scheduler.Freeze(context.WithoutCancel(ctx), g, scheduler.Pushback529, ue.RetryAfter+time.Second); ferr != nil {
			a.log.Error("could not record overload", "err", ferr)
		}
	}
	failures := job.Failures + 1
	if failures >= w.d.Config.Upstream.MaxAttempts {
		w.fail(ctx, a, used, &jobs.Error{Type: "upstream_unavailable", Message: fmt.Sprintf(
			"The Anthropic API failed %d times in a row for this request (last: %s). Please try again later.",
			failures, describe(ue))})
		return nil
	}
	w.settle(ctx, a, used, 0, false)
	delay := backoff(w.d.Config.Upstream.BackoffBase, w.d.Config.Upstream.BackoffMax, failures)
	delay = max(delay, ue.RetryAfter)
	job.Failures = failures
	return w.retry(ctx, a, ue, delay, true)
}

// retry announces the retry and puts the job back in its queue, due after
// delay. The announcement comes first: once queued, another dispatch may
// start at once.
func (w *Worker) retry(ctx context.Context, a *attempt, ue *upstream.Error, delay time.Duration, failure bool) error {
	job := a.job
	set := map[string]string{}
	if failure {
		set["failures"] = fmt.Sprint(job.Failures)
	}
	a.log.Info("attempt failed; retrying", "reason", ue.Reason(), "retry_in", delay.Round(time.Millisecond))
	_, err := w.d.Store.Apply(context.WithoutCancel(ctx), job, jobs.Transition{
		From: []jobs.Status{jobs.Running}, To: jobs.Running, Dispatch: a.dispatch,
		Set:   set,
		Event: "retrying",
		EventData: map[string]any{
			"attempt": job.Attempts, "reason": ue.Reason(), "retry_in_seconds": math.Round(delay.Seconds()*1000) / 1000,
		},
	})
	var se *jobs.StateError
	if errors.As(err, &se) {
		return nil // canceled meanwhile, or superseded
	}
	if err != nil {
		return err
	}
	if err := w.d.Scheduler.Requeue(context.WithoutCancel(ctx), a.group, job, delay); err != nil {
		return err
	}
	return nil
}

// backoff is exponential with full jitter: a random delay in
// [base·2^(n-1)/2, base·2^(n-1)], capped at max.
func backoff(base, max time.Duration, n int) time.Duration {
	d := base
	for i := 1; i < n && d < max; i++ {
		d *= 2
	}
	if d > max {
		d = max
	}
	return d/2 + rand.N(d/2+1)
}

// asynqLogger routes asynq's logs to slog.
type asynqLogger struct{ l *slog.Logger }

func (a asynqLogger) Debug(args ...any) { a.l.Debug(fmt.Sprint(args...)) }
func (a asynqLogger) Info(args ...any)  { a.l.Info(fmt.Sprint(args...)) }
func (a asynqLogger) Warn(args ...any)  { a.l.Warn(fmt.Sprint(args...)) }
func (a asynqLogger) Error(args ...any) { a.l.Error(fmt.Sprint(args...)) }
func (a asynqLogger) Fatal(args ...any) { a.l.Error(fmt.Sprint(args...)) }
