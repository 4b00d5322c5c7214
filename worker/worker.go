// Package worker runs jobs: the asynq handler that makes one upstream call
// for a queued chat request, with a concurrency slot in hand, streams its
// text into the job's event log, stores the result and usage, and decides
// what a failure means (wait, back off, or give up). Retry policy lives here.
package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/limiter"
	"github.com/sluice-dev/sluice/tasks"
	"github.com/sluice-dev/sluice/upstream"
)

// Deps are what a Worker needs.
type Deps struct {
	Config   *config.Config
	Redis    redis.UniversalClient
	Store    *jobs.Store
	Upstream *upstream.Client
	Leases   *limiter.Leases
	Logger   *slog.Logger
	Clock    func() time.Time // nil = time.Now
}

// Worker is an asynq server with one queue per model group.
type Worker struct {
	d      Deps
	srv    *asynq.Server
	base   context.Context
	cancel context.CancelFunc
	groups map[string]*config.ModelGroup

	stopOnce sync.Once
}

// slotWait is how long a job waits before trying again for a concurrency
// slot of its group (jittered by half on each side).
const slotWait = 100 * time.Millisecond

// New builds a Worker; Start runs it.
func New(d Deps) *Worker {
	if d.Clock == nil {
		d.Clock = time.Now
	}
	cfg := d.Config
	w := &Worker{d: d, groups: map[string]*config.ModelGroup{}}
	w.base, w.cancel = context.WithCancel(context.Background())
	queues := map[string]int{}
	concurrency := 0
	for i := range cfg.ModelGroups {
		g := &cfg.ModelGroups[i]
		w.groups[g.Name] = g
		queues[tasks.Queue(g.Name)] = 1
		// Each process may run up to a group's cap; the fleet-wide cap is the
		// group's concurrency leases, which every process shares.
		concurrency += g.MaxConcurrency
	}
	w.srv = asynq.NewServerFromRedisClient(d.Redis, asynq.Config{
		Concurrency:              concurrency,
		Queues:                   queues,
		BaseContext:              func() context.Context { return w.base },
		TaskCheckInterval:        cfg.Worker.TaskCheckInterval,
		DelayedTaskCheckInterval: 50 * time.Millisecond,
		ShutdownTimeout:          cfg.Worker.ShutdownTimeout,
		IsFailure:                isFailure,
		RetryDelayFunc:           retryDelay,
		Logger:                   asynqLogger{d.Logger.With("component", "asynq")},
		LogLevel:                 asynq.WarnLevel,
		ErrorHandler: asynq.ErrorHandlerFunc(func(ctx context.Context, t *asynq.Task, err error) {
			var w *waitError
			if errors.As(err, &w) {
				return // an expected wait, not worth a log line
			}
			id, _ := asynq.GetTaskID(ctx)
			d.Logger.Debug("task attempt ended with an error", "job_id", id, "err", err)
		}),
	})
	return w
}

// Handler is the worker's task mux: every task type it runs.
func (w *Worker) Handler() asynq.Handler {
	mux := asynq.NewServeMux()
	mux.HandleFunc(tasks.TypeRunJob, w.RunJob)
	return mux
}

// Start begins processing; it returns at once.
func (w *Worker) Start() error {
	if err := w.srv.Start(w.Handler()); err != nil {
		return fmt.Errorf("worker: start: %w", err)
	}
	return nil
}

// Shutdown stops taking tasks, lets running calls finish within the
// configured shutdown timeout, then cancels them (they go back to their queue
// and run again elsewhere, as a new attempt).
func (w *Worker) Shutdown() {
	w.stopOnce.Do(func() {
		grace := w.d.Config.Worker.ShutdownTimeout
		// Cancel handlers a little before asynq gives up on them, so they
		// return cleanly and asynq re-queues them without a lost update.
		t := time.AfterFunc(grace*9/10, w.cancel)
		defer t.Stop()
		w.srv.Shutdown()
		w.cancel()
	})
}

// waitError asks asynq to run the task again after delay. failure says
// whether it used up one of the job's attempts.
type waitError struct {
	delay   time.Duration
	failure bool
	cause   error
}

func (e *waitError) Error() string {
	return fmt.Sprintf("retry in %s: %v", e.delay.Round(time.Millisecond), e.cause)
}
func (e *waitError) Unwrap() error { return e.cause }

// errShutdown: the process is stopping; the task goes back to the queue
// without using up an attempt.
var errShutdown = errors.New("worker shutting down")

func isFailure(err error) bool {
	var w *waitError
	if errors.As(err, &w) {
		return w.failure
	}
	return !errors.Is(err, errShutdown)
}

func retryDelay(n int, err error, t *asynq.Task) time.Duration {
	var w *waitError
	if errors.As(err, &w) {
		return w.delay
	}
	if errors.Is(err, errShutdown) {
		return 0
	}
	return asynq.DefaultRetryDelayFunc(n, err, t)
}

// RunJob is the handler of tasks.TypeRunJob.
func (w *Worker) RunJob(ctx context.Context, t *asynq.Task) error {
	p, err := tasks.ParseRunJob(t)
	if err != nil {
		return fmt.Errorf("%v: %w", err, asynq.SkipRetry)
	}
	log := w.d.Logger.With("job_id", p.JobID, "group", p.Group)
	job, err := w.d.Store.Get(ctx, p.JobID)
	if errors.Is(err, jobs.ErrNotFound) {
		log.Warn("job record is gone (expired or deleted); dropping its task")
		return nil
	}
	if err != nil {
		return w.stopping(ctx, err)
	}
	log = log.With("tenant", job.Tenant, "user_id", job.UserID)
	if job.Status.Terminal() {
		return nil // canceled or expired while queued, or a duplicate delivery
	}
	if job.Status == jobs.Queued && !job.DeadlineAt.IsZero() && w.d.Clock().After(job.DeadlineAt) {
		// Not started by its deadline: it expires without an upstream call.
		_, err := w.d.Store.Apply(ctx, job.ID, job.Group, jobs.Transition{
			From: []jobs.Status{jobs.Queued}, To: jobs.Expired,
			Set:   map[string]string{"finished_at": jobs.MillisString(w.now())},
			Event: "expired", EventData: struct{}{},
		})
		var se *jobs.StateError
		if err != nil && !errors.As(err, &se) {
			return w.stopping(ctx, err)
		}
		log.Info("job expired before it could start")
		return nil
	}
	g, ok := w.groups[job.Group]
	if !ok {
		w.fail(ctx, log, job, &jobs.Error{Type: "invalid_request",
			Message: fmt.Sprintf("The model group %q of this job is no longer configured, so it cannot run.", job.Group)})
		return fmt.Errorf("unknown group %q: %w", job.Group, asynq.SkipRetry)
	}

	// asynq schedules retries to the whole second, rounding down: wait out
	// the rest of a retry's delay here, so a retry-after is never cut short.
	if wait := job.NotBefore.Sub(w.d.Clock()); wait > 0 {
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return errShutdown
		}
	}

	// A fleet-wide concurrency slot of the group, renewed while we work.
	got, _, err := w.d.Leases.Acquire(ctx, g.Name, g.MaxConcurrency, job.ID)
	if err != nil {
		return w.stopping(ctx, err)
	}
	if !got {
		return &waitError{delay: jitter(slotWait), cause: errors.New("no concurrency slot free")}
	}
	leaseCtx, stopLease := context.WithCancel(ctx)
	var leaseWG sync.WaitGroup
	leaseWG.Add(1)
	go func(log *slog.Logger) { defer leaseWG.Done(); w.renewLease(leaseCtx, log, g.Name, job.ID) }(log)
	defer func() {
		stopLease()
		leaseWG.Wait()
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		if err := w.d.Leases.Release(rctx, g.Name, job.ID); err != nil {
			log.Warn("could not release concurrency slot; it expires with its lease", "err", err)
		}
	}()

	if job.StartedAt.IsZero() {
		job.StartedAt = w.now() // the first attempt's start is the job's
	}
	attempt, err := w.d.Store.Apply(ctx, job.ID, job.Group, jobs.Transition{
		From: []jobs.Status{jobs.Queued, jobs.Running}, To: jobs.Running, CountAttempt: true,
		SetIfAbsent:   map[string]string{"started_at": jobs.MillisString(job.StartedAt)},
		Event:         "started",
		EventDataJSON: []byte(`{"attempt":"__ATTEMPTS__"}`),
	})
	var se *jobs.StateError
	if errors.As(err, &se) || errors.Is(err, jobs.ErrNotFound) {
		return nil // canceled meanwhile
	}
	if err != nil {
		return w.stopping(ctx, err)
	}
	job.Attempts = attempt
	log = log.With("attempt", attempt)

	body, err := upstreamBody(job)
	if err != nil {
		w.fail(ctx, log, job, &jobs.Error{Type: "invalid_request", Message: "This job's request could not be read: " + err.Error()})
		return fmt.Errorf("%v: %w", err, asynq.SkipRetry)
	}
	callCtx, cancelCall := context.WithTimeout(leaseCtx, w.d.Config.Upstream.AttemptTimeout)
	defer cancelCall()
	var appendErr error
	res, err := w.d.Upstream.Stream(callCtx, body, func(text string) {
		if appendErr != nil {
			return
		}
		if _, appendErr = w.d.Store.Append(ctx, job.ID, jobs.Running, "delta", map[string]string{"text": text}); appendErr != nil {
			cancelCall() // canceled by its user, or the store is gone: stop paying for output
		}
	})
	if appendErr != nil {
		if errors.As(appendErr, &se) {
			log.Info("job left running during the call; upstream call stopped", "status", se.Current)
			return nil
		}
		return w.stopping(ctx, appendErr)
	}
	if err != nil {
		return w.failedAttempt(ctx, callCtx, log, job, err)
	}
	return w.succeed(ctx, log, job, res)
}

// now is the clock as job records keep it: UTC, whole milliseconds.
func (w *Worker) now() time.Time { return w.d.Clock().UTC().Truncate(time.Millisecond) }

// stopping turns an error seen while the process stops into errShutdown.
func (w *Worker) stopping(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return errShutdown
	}
	return err
}

func (w *Worker) renewLease(ctx context.Context, log *slog.Logger, group, holder string) {
	tick := time.NewTicker(w.d.Leases.TTL() / 3)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			ok, err := w.d.Leases.Renew(ctx, group, holder)
			if err != nil && ctx.Err() == nil {
				log.Warn("could not renew concurrency slot", "err", err)
			} else if !ok && ctx.Err() == nil {
				log.Warn("concurrency slot lease had expired; renewed late")
			}
		}
	}
}

func (w *Worker) succeed(ctx context.Context, log *slog.Logger, job *jobs.Job, res *upstream.Result) error {
	now := w.now()
	usage := jobs.Usage(res.Usage)
	ub, _ := json.Marshal(usage)
	job.Status, job.Result, job.Text, job.Usage, job.FinishedAt = jobs.Succeeded, res.Message, res.Text, &usage, now
	view := job.View()
	_, err := w.d.Store.Apply(context.WithoutCancel(ctx), job.ID, job.Group, jobs.Transition{
		From: []jobs.Status{jobs.Running}, To: jobs.Succeeded,
		Set: map[string]string{
			"result": string(res.Message), "text": res.Text, "usage": string(ub),
			"finished_at": jobs.MillisString(now),
		},
		Event: "succeeded", EventData: view,
	})
	var se *jobs.StateError
	if errors.As(err, &se) {
		log.Info("job finished upstream after leaving running; result not stored", "status", se.Current)
		return nil
	}
	if err != nil {
		return err
	}
	log.Info("job succeeded", "input_tokens", usage.InputTokens, "output_tokens", usage.OutputTokens)
	return nil
}

// fail ends the job as failed with a message for a person.
func (w *Worker) fail(ctx context.Context, log *slog.Logger, job *jobs.Job, e *jobs.Error) {
	eb, _ := json.Marshal(e)
	_, err := w.d.Store.Apply(context.WithoutCancel(ctx), job.ID, job.Group, jobs.Transition{
		From: []jobs.Status{jobs.Queued, jobs.Running}, To: jobs.Failed,
		Set:   map[string]string{"error": string(eb), "finished_at": jobs.MillisString(w.now())},
		Event: "failed", EventData: map[string]any{"error": e},
	})
	if err != nil {
		var se *jobs.StateError
		if !errors.As(err, &se) {
			log.Error("could not record job failure", "err", err)
		}
		return
	}
	log.Warn("job failed", "error_type", e.Type)
}

// failedAttempt decides what an upstream failure means: wait (rate limit),
// back off and retry (transient), or fail the job (the request is refused,
// the spend limit is reached, or the attempts are used up).
func (w *Worker) failedAttempt(ctx, callCtx context.Context, log *slog.Logger, job *jobs.Job, err error) error {
	var ue *upstream.Error
	if !errors.As(err, &ue) {
		ue = &upstream.Error{Kind: upstream.KindRetryable, Message: err.Error(), Err: err}
	}
	if ue.Kind == upstream.KindCanceled {
		if ctx.Err() != nil {
			return errShutdown // the process is stopping: another worker takes it
		}
		// Our own attempt timeout.
		ue = &upstream.Error{Kind: upstream.KindRetryable, Message: fmt.Sprintf("the upstream call took longer than %s", w.d.Config.Upstream.AttemptTimeout), Err: callCtx.Err()}
	}
	log = log.With("upstream_status", ue.Status, "upstream_type", ue.Type, "request_id", ue.RequestID)
	switch ue.Kind {
	case upstream.KindFatal, upstream.KindSpendLimit:
		w.fail(ctx, log, job, jobError(ue))
		return fmt.Errorf("%v: %w", ue, asynq.SkipRetry)
	case upstream.KindRateLimited:
		delay := ue.RetryAfter + jitterUp(ue.RetryAfter/10+50*time.Millisecond)
		w.announceRetry(ctx, log, job, ue, delay)
		return &waitError{delay: delay, failure: false, cause: ue}
	}
	failures := 0
	if n, ok := asynq.GetRetryCount(ctx); ok {
		failures = n
	}
	failures++ // this one
	if failures >= w.d.Config.Upstream.MaxAttempts {
		w.fail(ctx, log, job, &jobs.Error{Type: "upstream_unavailable", Message: fmt.Sprintf(
			"The Anthropic API failed %d times in a row for this request (last: %s). Please try again later.",
			failures, describe(ue))})
		return fmt.Errorf("%v: %w", ue, asynq.SkipRetry)
	}
	delay := backoff(w.d.Config.Upstream.BackoffBase, w.d.Config.Upstream.BackoffMax, failures)
	if ue.RetryAfter > delay {
		delay = ue.RetryAfter
	}
	w.announceRetry(ctx, log, job, ue, delay)
	return &waitError{delay: delay, failure: true, cause: ue}
}

func (w *Worker) announceRetry(ctx context.Context, log *slog.Logger, job *jobs.Job, ue *upstream.Error, delay time.Duration) {
	log.Info("attempt failed; retrying", "reason", ue.Reason(), "retry_in", delay.Round(time.Millisecond))
	_, err := w.d.Store.Apply(context.WithoutCancel(ctx), job.ID, job.Group, jobs.Transition{
		From: []jobs.Status{jobs.Running}, To: jobs.Running,
		Set:   map[string]string{"not_before": jobs.MillisString(w.d.Clock().Add(delay))},
		Event: "retrying",
		EventData: map[string]any{
			"attempt": job.Attempts, "reason": ue.Reason(), "retry_in_seconds": math.Round(delay.Seconds()*1000) / 1000,
		},
	})
	if err != nil {
		var se *jobs.StateError
		if !errors.As(err, &se) {
			log.Warn("could not log retrying event", "err", err)
		}
	}
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

// jitter spreads d by ±50%.
func jitter(d time.Duration) time.Duration { return d/2 + rand.N(d+1) }

// jitterUp adds up to d.
func jitterUp(d time.Duration) time.Duration { return rand.N(d + 1) }

// asynqLogger routes asynq's logs to slog.
type asynqLogger struct{ l *slog.Logger }

func (a asynqLogger) Debug(args ...any) { a.l.Debug(fmt.Sprint(args...)) }
func (a asynqLogger) Info(args ...any)  { a.l.Info(fmt.Sprint(args...)) }
func (a asynqLogger) Warn(args ...any)  { a.l.Warn(fmt.Sprint(args...)) }
func (a asynqLogger) Error(args ...any) { a.l.Error(fmt.Sprint(args...)) }
func (a asynqLogger) Fatal(args ...any) { a.l.Error(fmt.Sprint(args...)) }
