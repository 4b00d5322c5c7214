package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hibiken/asynq"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/estimate"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/scheduler"
	"github.com/sluice-dev/sluice/tasks"
	"github.com/sluice-dev/sluice/upstream"
	"github.com/sluice-dev/sluice/usage"
)

// attempt is one run of a dispatched job.
type attempt struct {
	scheduler.Attempt
	log *slog.Logger
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
		if _, _, err := w.d.Scheduler.Settle(context.WithoutCancel(ctx), scheduler.Settlement{Group: g, Job: &jobs.Job{ID: p.JobID}}); err != nil {
			log.Error("could not return the reservation of a job whose record is gone", "err", err)
		}
		return nil
	}
	if err != nil {
		return err
	}
	a := &attempt{Attempt: scheduler.Attempt{Group: g, Job: job, Dispatch: p.Dispatch},
		log: log.With("tenant", job.Tenant, "user_id", job.UserID)}
	switch {
	case job.Dispatch != p.Dispatch:
		return nil // superseded: the job was queued again and handed to another task
	case job.Status.Terminal():
		return nil // canceled, expired or failed after dispatch: that step settled it
	case job.Status == jobs.Queued && !job.DeadlineAt.IsZero() && w.d.Clock().After(job.DeadlineAt):
		w.expire(ctx, g, job)
		return nil
	}
	return w.run(ctx, a)
}

// run makes the attempt's upstream call and ends the attempt.
//
// An answer that arrived is never bought again: once the upstream's
// message_stop is in, the attempt ends in success whatever Redis does
// meanwhile (keep). The answer streams into the job's event log beside the
// call (deltaLog), so a slow or absent Redis never holds the call up, and
// the lease's heartbeat runs until the attempt has ended, however long
// writing its end takes.
func (w *Worker) run(ctx context.Context, a *attempt) error {
	job, g := a.Job, a.Group
	held, err := w.d.Scheduler.Renew(ctx, g.Name, job.ID, a.Dispatch)
	if err != nil {
		return err
	}
	if !held {
		a.log.Info("lease taken back before the call started; the job was queued again")
		return nil
	}
	callCtx, cancelCall := context.WithCancel(ctx)
	defer cancelCall()
	var lost atomic.Bool
	hbCtx, stopHeartbeat := context.WithCancel(context.WithoutCancel(ctx))
	var hb sync.WaitGroup
	hb.Add(1)
	go func() {
		defer hb.Done()
		w.heartbeat(hbCtx, a, func() { lost.Store(true); cancelCall() })
	}()
	defer func() { stopHeartbeat(); hb.Wait() }()

	startedAt := job.StartedAt
	first := startedAt.IsZero()
	if first {
		startedAt = w.now() // the first attempt's start is the job's
	}
	n, err := w.d.Scheduler.Start(ctx, a.Attempt, startedAt)
	if refused(err) {
		return nil // delivered twice, dispatched again, or ended meanwhile (that step settled it)
	}
	if err != nil {
		return err
	}
	job.Attempts, job.StartedAt = n, startedAt
	a.log = a.log.With("attempt", n)
	if first {
		w.d.Metrics.Waited(g.Name, job.StartedAt.Sub(job.CreatedAt))
	}
	w.running.Store(job.ID, cancelCall)
	defer w.running.Delete(job.ID)

	body, err := upstreamBody(job)
	if err != nil {
		w.fail(a, scheduler.Used{}, nil, jobs.Error{Type: "invalid_request", Message: "This job's request could not be read: " + err.Error()})
		return nil
	}
	attemptCtx, cancelAttempt := context.WithTimeout(callCtx, w.d.Config.Upstream.AttemptTimeout)
	defer cancelAttempt()
	deltas := newDeltaLog(func(ctx context.Context, evs []jobs.NewEvent) error {
		_, err := w.d.Store.AppendEvents(ctx, job.ID, jobs.Running, a.Dispatch, evs)
		return err
	}, cancelAttempt, a.log)
	go deltas.run(w.hard)
	defer deltas.close()

	start := time.Now()
	call := w.d.Metrics.Call(g.Name)
	res, err := w.d.Upstream.Stream(attemptCtx, body,
		func(h http.Header, u upstream.Usage) {
			w.observe(ctx, a, h, true)
			w.cacheBegan(ctx, a, u)
		},
		func(p upstream.Part) {
			if p.Kind == upstream.PartText || p.Kind == upstream.PartBlockDelta {
				call.Text() // the first token
			}
			deltas.add(p)
		})
	elapsed := time.Since(start)
	call.End(callStatus(err))
	if err == nil {
		w.keep(ctx, a, res, deltas, elapsed)
		return nil
	}
	// What the attempt streamed is logged before its end is, and its writer
	// stopped, so that every delta and block of an abandoned attempt comes
	// before its retrying event (nothing of it can follow and be taken for
	// the next attempt's).
	fctx, cancelFlush := context.WithTimeout(w.hard, persistTry)
	_ = deltas.flush(fctx)
	cancelFlush()
	deltas.close()
	var ue *upstream.Error
	if !errors.As(err, &ue) {
		ue = &upstream.Error{Kind: upstream.KindRetryable, Message: err.Error(), Err: err}
	}
	if !ue.Started {
		w.cacheReleased(ctx, a)
	}
	stopped := ue.Kind == upstream.KindCanceled || callCtx.Err() != nil
	switch {
	case deltas.refusal() != nil || stopped && ctx.Err() == nil && !lost.Load():
		// The job left this attempt while the call ran: canceled by its
		// user (the api announced it, or a delta write was refused).
		w.ended(a, ue)
		return nil
	case lost.Load():
		a.log.Warn("lease taken back during the call; the job runs again elsewhere")
		return nil
	}
	w.failedAttempt(ctx, a, ue, elapsed)
	return nil
}

// keep ends the attempt with its answer: the deltas still waiting are
// written first (so `succeeded` comes after every delta), then the success.
// A Redis error is tried again until Redis answers, for as long as the
// process runs and, when it is stopping, until its shutdown timeout.
func (w *Worker) keep(ctx context.Context, a *attempt, res *upstream.Result, deltas *deltaLog, elapsed time.Duration) {
	job, g := a.Job, a.Group
	now := w.now()
	u := jobs.Usage(res.Usage)
	input := inputCounted(g, res.Usage)
	s := scheduler.Success{
		Attempt: a.Attempt, Result: res.Message, Text: res.Text, Usage: u,
		Used:     scheduler.Used{Requests: 1, Input: input, Output: res.Usage.OutputTokens},
		Duration: elapsed, At: now, Policy: w.policy(job),
	}
	if w.d.Usage != nil {
		s.Tallies = append(w.d.Usage.CallTallies(usage.Call{Group: job.Group, Tenant: job.Tenant, UserID: job.UserID,
			JobID: job.ID, Model: job.Model, Usage: u, At: now}),
			w.tallies(job, true, now)...)
	}
	err := w.persist(a, "the answer", func(ctx context.Context) error {
		if err := deltas.flush(ctx); err != nil && !refused(err) {
			return err
		}
		return w.d.Scheduler.Succeed(ctx, s)
	})
	var se *jobs.StateError
	switch {
	case err == nil:
	case errors.As(err, &se) && se.Current == jobs.Succeeded:
		// An earlier try was written after all (its reply was lost).
	case errors.As(err, &se) && se.Current.Terminal():
		a.log.Info("job ended while its answer arrived; the answer is not kept", "status", se.Current)
		j := *job
		j.Status = se.Current
		w.stop(a, &j, s.Used, w.callTallies(job, u, 0, now))
		return
	case refused(err):
		a.log.Warn("job was dispatched again before its answer could be written; the answer is not kept", "err", err)
		return
	case w.hard.Err() != nil:
		// Redis stayed away through the whole shutdown timeout: the answer
		// is lost with this process, and the job runs again (its lease
		// expires) once Redis is back.
		a.log.Error("the worker is stopping and Redis never took the answer; the job will run again", "err", err)
		return
	default:
		a.log.Error("could not write the answer", "err", err)
		return
	}
	if w.d.Estimator != nil {
		// The whole input, however much of it the cache served: the
		// calibration learns the tokenizer, not the cache (prefixes the
		// upstream holds are subtracted at dispatch).
		all := res.Usage.InputTokens + res.Usage.CacheCreationInputTokens + res.Usage.CacheReadInputTokens
		if err := w.d.Estimator.Observe(context.WithoutCancel(ctx), job.Model, estimate.Raw(job.Request), all); err != nil {
			a.log.Warn("could not update the token estimate", "err", err)
		}
	}
	w.d.Metrics.Finished(g.Name, string(jobs.Succeeded))
	w.d.Metrics.Tokens(g.Name, u.InputTokens, u.OutputTokens, u.CacheReadInputTokens, u.CacheCreationInputTokens)
	w.d.Metrics.Estimate(g.Name, input, job.CostIn)
	a.log.Info("job succeeded", "input_tokens", u.InputTokens, "output_tokens", u.OutputTokens, "seconds", math.Round(elapsed.Seconds()*1000)/1000)
}

// persistTry bounds one try of a write that persist repeats.
const persistTry = 5 * time.Second

// persist runs write until Redis takes it: a Redis error is tried again,
// with backoff, while the heartbeat keeps the job's lease, until the
// worker must stop (w.hard). It returns nil, a refusal from the job's
// lifecycle (the job moved on: see refused), or the last error when the
// worker had to stop first. A refusal that says the attempt was already
// ended counts as done: an earlier try was written, only its reply was
// lost.
func (w *Worker) persist(a *attempt, what string, write func(context.Context) error) error {
	delay := 50 * time.Millisecond
	warned := false
	for {
		ctx, cancel := context.WithTimeout(w.hard, persistTry)
		err := write(ctx)
		cancel()
		switch {
		case err == nil, errors.Is(err, scheduler.ErrAttemptEnded):
			if warned {
				a.log.Info("recorded " + what + " after all")
			}
			return nil
		case refused(err):
			return err
		case w.hard.Err() != nil:
			return err
		}
		if !warned {
			a.log.Warn("could not record "+what+"; trying again until Redis answers", "err", err)
			warned = true
		}
		select {
		case <-w.hard.Done():
			return err
		case <-time.After(delay):
		}
		delay = min(2*delay, 2*time.Second)
	}
}

// refused reports whether err is the job's lifecycle refusing a step (the
// job is not where the step expects it), as opposed to Redis failing.
func refused(err error) bool {
	var se *jobs.StateError
	return errors.As(err, &se) || errors.Is(err, jobs.ErrNotFound) || errors.Is(err, scheduler.ErrSuperseded) ||
		errors.Is(err, scheduler.ErrAttemptEnded) || errors.Is(err, scheduler.ErrAttemptRunning)
}

// ended settles the attempt of a job that ended (canceled) while its call
// ran, with what the call used.
func (w *Worker) ended(a *attempt, ue *upstream.Error) {
	cur, err := w.d.Store.Get(context.Background(), a.Job.ID)
	if err != nil {
		a.log.Error("could not read a stopped job; its reservation returns with its lease", "err", err)
		return
	}
	if !cur.Status.Terminal() {
		// Stopped without a cancel: the attempt runs again.
		w.retry(a, ue, scheduler.Retry{Reason: "worker_stopped"})
		return
	}
	a.log.Info("job left running during the call; upstream call stopped", "status", cur.Status)
	j := *a.Job
	j.Status = cur.Status
	u, estimated := billed(ue, a.Job)
	w.stop(a, &j, used(ue, a.Job), w.callTallies(a.Job, u, estimated, w.now()))
}

// stop settles the attempt of job j, which ended as j.Status.
func (w *Worker) stop(a *attempt, j *jobs.Job, u scheduler.Used, tallies []jobs.Tally) {
	err := w.persist(a, "the stopped call's usage", func(ctx context.Context) error {
		return w.d.Scheduler.Stop(ctx, scheduler.Stopped{
			Attempt: scheduler.Attempt{Group: a.Group, Job: j, Dispatch: a.Dispatch},
			Used:    u, Policy: w.policy(j), Tallies: tallies,
		})
	})
	if err != nil && !refused(err) {
		a.log.Error("could not settle a stopped call", "err", err)
	}
}

// tallies are the usage statistics of a job that ends (none without a
// recorder).
func (w *Worker) tallies(j *jobs.Job, ok bool, now time.Time) []jobs.Tally {
	if w.d.Usage == nil {
		return nil
	}
	f := usage.Finished{Group: j.Group, Tenant: j.Tenant, UserID: j.UserID, Succeeded: ok, Latency: now.Sub(j.CreatedAt), Wait: -1, At: now}
	if !j.StartedAt.IsZero() {
		f.Wait = j.StartedAt.Sub(j.CreatedAt)
	}
	return w.d.Usage.Tallies(f)
}

// callTallies are the usage statistics of an upstream call.
func (w *Worker) callTallies(j *jobs.Job, u jobs.Usage, estimated int, now time.Time) []jobs.Tally {
	if w.d.Usage == nil {
		return nil
	}
	return w.d.Usage.CallTallies(usage.Call{Group: j.Group, Tenant: j.Tenant, UserID: j.UserID,
		JobID: j.ID, Model: j.Model, Usage: u, Estimated: estimated, At: now})
}

// billed is what the upstream bills for a call that failed: what its
// stream reported (input from message_start; output the larger of what it
// reported and an estimate from the text received), the input estimate
// when it was cut before saying; estimated is how many of those tokens are
// sluice's estimate. Nothing when it never
// reached the upstream or was refused with an error status.
func billed(ue *upstream.Error, j *jobs.Job) (u jobs.Usage, estimated int) {
	switch {
	case ue.Started:
		return jobs.Usage(ue.Partial), ue.Partial.OutputTokens
	case ue.Unsent || ue.Status != 0:
		return jobs.Usage{}, 0
	}
	return jobs.Usage{InputTokens: j.CostIn}, j.CostIn
}

// reached reports whether a failed call reached the upstream (it counts as
// an upstream call in the usage statistics).
func reached(ue *upstream.Error) bool { return !ue.Unsent }

// used is what the limiter counts of a failed call: what it billed, and
// the request whenever it reached the upstream.
func used(ue *upstream.Error, j *jobs.Job) scheduler.Used {
	if !reached(ue) {
		return scheduler.Used{}
	}
	u, _ := billed(ue, j)
	return scheduler.Used{Requests: 1, Input: u.InputTokens + u.CacheCreationInputTokens, Output: min(u.OutputTokens, j.MaxTokens)}
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

// heartbeat renews the job's lease every third of its TTL, and every half
// second after a failed renewal (Redis away) so that the lease is renewed
// as soon as Redis is back; onLost is called when the lease was taken back
// (the job may be running again elsewhere).
func (w *Worker) heartbeat(ctx context.Context, a *attempt, onLost func()) {
	every := w.d.Scheduler.LeaseTTL() / 3
	t := time.NewTimer(every)
	defer t.Stop()
	warned := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		rctx, cancel := context.WithTimeout(ctx, persistTry)
		ok, err := w.d.Scheduler.Renew(rctx, a.Group.Name, a.Job.ID, a.Dispatch)
		cancel()
		switch {
		case err != nil && ctx.Err() == nil:
			if !warned {
				a.log.Warn("could not renew the job's lease; trying again", "err", err)
				warned = true
			}
			t.Reset(min(every, 500*time.Millisecond))
			continue
		case err == nil && !ok:
			onLost()
			return
		}
		warned = false
		t.Reset(every)
	}
}

func (w *Worker) observe(ctx context.Context, a *attempt, h http.Header, answered bool) {
	reopened, err := w.d.Scheduler.Observe(context.WithoutCancel(ctx), a.Group, h, answered)
	if err != nil {
		a.log.Warn("could not record the upstream's answer (rate-limit headers, health)", "err", err)
	}
	if reopened {
		a.log.Warn("the upstream answers again: the model group's outage is over; dispatch resumes, paced")
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

func (w *Worker) expire(ctx context.Context, g *config.ModelGroup, job *jobs.Job) {
	log := w.d.Logger.With("job_id", job.ID, "group", g.Name, "tenant", job.Tenant, "user_id", job.UserID)
	err := w.d.Scheduler.Expire(context.WithoutCancel(ctx), g, job, w.now(), w.policy(job))
	if err != nil {
		if !refused(err) {
			log.Error("could not expire job", "err", err)
		}
		return
	}
	w.d.Metrics.Finished(g.Name, string(jobs.Expired))
	log.Info("job expired before it could start; nothing was sent upstream")
}

// expireQueued ends a job the dispatcher took out of its queue: its
// deadline passed while it waited (queued: it expires; waiting to retry
// through an outage: it fails), or its group's outage outlasted
// upstream.max_outage (it fails).
func (w *Worker) expireQueued(ctx context.Context, g *config.ModelGroup, id string) error {
	job, err := w.d.Store.Get(ctx, id)
	if errors.Is(err, jobs.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	now := w.d.Clock()
	if job.Status == jobs.Queued && !job.DeadlineAt.IsZero() && !now.Before(job.DeadlineAt) {
		w.expire(ctx, g, job)
		return nil
	}
	if job.Status.Terminal() {
		return nil
	}
	a := &attempt{Attempt: scheduler.Attempt{Group: g, Job: job},
		log: w.d.Logger.With("job_id", id, "group", g.Name, "tenant", job.Tenant, "user_id", job.UserID)}
	msg := fmt.Sprintf("The Anthropic API has been unreachable or failing for longer than this service waits (%s), so this request was given up; it was not answered, and your quota was not charged for it. Please try again later.",
		w.d.Config.Upstream.MaxOutage)
	if !job.DeadlineAt.IsZero() && !now.Before(job.DeadlineAt) {
		msg = "The Anthropic API was unreachable or failing until this request's deadline passed, so it was given up; it was not answered. Please try again later."
	}
	w.fail(a, scheduler.Used{}, nil, jobs.Error{Type: "upstream_unavailable", Message: msg})
	return nil
}

// fail ends the job as failed with a message for a person, and settles it
// with what the upstream used (the attempt's, when a.Dispatch > 0).
func (w *Worker) fail(a *attempt, u scheduler.Used, callTallies []jobs.Tally, e jobs.Error) {
	now := w.now()
	f := scheduler.Failure{Attempt: a.Attempt, Error: e, Used: u, At: now, Policy: w.policy(a.Job),
		Tallies: append(callTallies, w.tallies(a.Job, false, now)...)}
	err := w.persist(a, "the job's failure", func(ctx context.Context) error { return w.d.Scheduler.Fail(ctx, f) })
	if err != nil {
		if !refused(err) {
			a.log.Error("could not record job failure; its lease expiry queues it again", "err", err)
		}
		return
	}
	w.d.Metrics.Finished(a.Group.Name, string(jobs.Failed))
	a.log.Warn("job failed", "error_type", e.Type)
}

// cacheBegan tells the scheduler what the answer's beginning said about
// the prompt cache: the group's cache figures, the job's prefixes known
// cached, and jobs held for them free to go.
func (w *Worker) cacheBegan(ctx context.Context, a *attempt, u upstream.Usage) {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), persistTry)
	defer cancel()
	_, err := w.d.Scheduler.CacheBegan(cctx, a.Group, a.Job.ID, scheduler.CacheUsage{
		Input: u.InputTokens, CacheCreation: u.CacheCreationInputTokens, CacheRead: u.CacheReadInputTokens})
	if err != nil {
		a.log.Warn("could not record the prompt cache's use (jobs held for it go when their hold ends)", "err", err)
	}
}

// cacheReleased frees the jobs held for the prefixes this call was to
// write: it ended before its answer began.
func (w *Worker) cacheReleased(ctx context.Context, a *attempt) {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), persistTry)
	defer cancel()
	if _, err := w.d.Scheduler.CacheReleased(cctx, a.Group, a.Job.ID); err != nil {
		a.log.Warn("could not release the job's prompt-cache writes (jobs held for them go when their hold ends)", "err", err)
	}
}
