package worker

import (
	"context"
	"crypto/rand"
	"errors"
	"log/slog"
	"net/http"
	"slices"
	"time"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/scheduler"
	"github.com/sluice-dev/sluice/upstream"
	"github.com/sluice-dev/sluice/usage"
)

// The Message Batches side of the worker, for every model group with
// batch on. Each worker process runs it for each such group (no leader:
// every step is an atomic script, so two processes never take the same
// job or finish one twice):
//
//   - collect: when the group's batch line is ready (its first job waited
//     the batch window, or the most jobs of a batch wait), take its jobs
//     under a claim, create the batch upstream, record it, start each job.
//     A creation the upstream refused puts the jobs back in line, and the
//     next try waits (doubling); a job no batch took by its fallback time
//     joins the Messages line.
//   - check: each batch is checked when due (the wait doubling up to 5
//     minutes); once ended, every job is finished from its result. A batch
//     whose jobs were all canceled is canceled upstream.
//   - recover: a claim never recorded (its worker died between the
//     creation and the record) is looked for upstream among the batches
//     created about then; any found is checked like the others and its
//     results finish the claim's jobs it held; the rest go back in line.
//
// A worker killed at any point leaves the batch, its jobs and the claim in
// Redis: another worker (or this one, restarted) checks it and collects
// its results once.

// Batch timing a test may shorten.
var (
	// batchCreateTimeout bounds one batch creation.
	batchCreateTimeout = time.Minute
	// batchClaimCheck is how long after a claim was made (or last looked
	// at) an unrecorded one is looked for upstream: well past a creation's
	// timeout, so a creation still under way is not taken for a lost one.
	batchClaimCheck = 2 * time.Minute
)

// runBatches runs collect and check for every group with batch on, until
// ctx ends.
func (w *Worker) runBatches(ctx context.Context) {
	done := make(chan struct{})
	n := 0
	for _, g := range w.groups {
		if !g.Batch {
			continue
		}
		n++
		go func(g *config.ModelGroup) {
			defer func() { done <- struct{}{} }()
			w.batchLoop(ctx, g)
		}(g)
	}
	for ; n > 0; n-- {
		<-done
	}
}

// batchLoop is one group's collect-and-check loop.
func (w *Worker) batchLoop(ctx context.Context, g *config.ModelGroup) {
	_, window, _, _, poll := g.BatchSettings()
	tick := min(max(min(window, poll)/4, 20*time.Millisecond), time.Second)
	log := w.d.Logger.With("component", "batches", "group", g.Name)
	var backoff time.Duration
	var notBefore time.Time
	for {
		if now := time.Now(); !now.Before(notBefore) {
			if err := w.collect(ctx, log, g); err != nil {
				backoff = min(max(2*backoff, window/2, 100*time.Millisecond), max(window, time.Minute))
				wait := backoff
				// The Batches API's own limits (batch requests per minute,
				// requests in its processing queue) answer 429 with a
				// retry-after: no try before it.
				if ue := (*upstream.Error)(nil); errors.As(err, &ue) && ue.RetryAfter > wait {
					wait = ue.RetryAfter
				}
				notBefore = now.Add(wait)
				log.Warn("could not send a batch; trying again later", "err", err, "retry_in", wait.String())
			} else {
				backoff = 0
			}
		}
		w.checkBatches(ctx, log, g)
		select {
		case <-ctx.Done():
			return
		case <-time.After(tick):
		}
	}
}

// collect sends the group's batch line as one batch when it is ready.
func (w *Worker) collect(ctx context.Context, log *slog.Logger, g *config.ModelGroup) error {
	_, window, maxJobs, _, poll := g.BatchSettings()
	claim := "cl_" + rand.Text()
	taken, _, err := w.d.Scheduler.TakeBatch(ctx, g.Name, window, maxJobs, claim)
	if err != nil || len(taken) == 0 {
		return err
	}
	// From here on the claim is in Redis: a shutdown does not cut the
	// steps short (an unknown outcome is left to recovery).
	bg := context.WithoutCancel(ctx)
	reqs := make([]upstream.BatchRequest, 0, len(taken))
	starts := make([]scheduler.Attempt, 0, len(taken))
	for _, bj := range taken {
		job, err := w.d.Store.Get(bg, bj.ID)
		if err != nil {
			log.Warn("a job taken for a batch could not be read; it goes back in line", "job_id", bj.ID, "err", err)
			continue
		}
		body, err := upstreamBody(job)
		if err != nil {
			log.Error("a job's request could not be prepared for a batch", "job_id", bj.ID, "err", err)
			continue
		}
		reqs = append(reqs, upstream.BatchRequest{CustomID: job.ID, Body: body})
		starts = append(starts, scheduler.Attempt{Group: g, Job: job, Dispatch: bj.Dispatch})
	}
	if len(reqs) == 0 {
		_, err := w.d.Scheduler.ReturnBatch(bg, g.Name, claim)
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, batchCreateTimeout)
	b, err := w.d.Upstream.CreateBatch(cctx, reqs)
	cancel()
	if err != nil {
		var ue *upstream.Error
		if errors.As(err, &ue) && (ue.Unsent || ue.Status != 0) {
			// Not created: the jobs wait for the next try.
			if _, rerr := w.d.Scheduler.ReturnBatch(bg, g.Name, claim); rerr != nil {
				log.Warn("could not put a batch's jobs back in line; they go back once the claim is looked at", "err", rerr)
			}
		} else {
			log.Warn("a batch's creation ended without an answer; the batch is looked for upstream later", "claim", claim, "jobs", len(reqs))
		}
		w.d.Metrics.Batch(g.Name, "create_failed", len(reqs))
		return err
	}
	recorded, err := w.d.Scheduler.RecordBatch(bg, g.Name, claim, b.ID, poll)
	if err != nil {
		log.Error("could not record a created batch; it is found upstream later", "batch_id", b.ID, "err", err)
		return nil
	}
	if !recorded {
		// The claim was given up meanwhile (its jobs went back in line):
		// the batch would answer them twice.
		log.Error("a batch was created after its claim was given up; canceling it upstream", "batch_id", b.ID)
		if _, err := w.d.Upstream.CancelBatch(bg, b.ID); err != nil {
			log.Error("could not cancel a batch nobody waits for", "batch_id", b.ID, "err", err)
		}
		return nil
	}
	w.d.Metrics.Batch(g.Name, "created", len(reqs))
	at := w.now()
	for _, a := range starts {
		if _, err := w.d.Scheduler.StartBatched(bg, a, b.ID, at); err != nil && !refused(err) {
			log.Warn("could not mark a job started in its batch; its result starts it", "job_id", a.Job.ID, "err", err)
		}
	}
	log.Info("batch sent", "batch_id", b.ID, "jobs", len(reqs))
	return nil
}

// checkBatches checks the group's batches that are due, and looks for
// the batches of claims never recorded.
func (w *Worker) checkBatches(ctx context.Context, log *slog.Logger, g *config.ModelGroup) {
	bs, cs, err := w.d.Scheduler.BatchesDue(ctx, g.Name, batchClaimCheck, config.BatchPollMax)
	if err != nil {
		if ctx.Err() == nil {
			log.Warn("could not read the group's batches", "err", err)
		}
		return
	}
	for _, e := range bs {
		if err := w.checkBatch(ctx, log.With("batch_id", e.ID), g, e); err != nil && ctx.Err() == nil {
			log.Warn("could not check a batch; it is checked again later", "batch_id", e.ID, "err", err)
		}
	}
	for _, c := range cs {
		if err := w.recoverClaim(ctx, log, g, c); err != nil && ctx.Err() == nil {
			log.Warn("could not look for a lost batch; looked for again later", "claim", c.ID, "err", err)
		}
	}
}

// checkBatch reads batch e's state and, once it ended, finishes its jobs.
func (w *Worker) checkBatch(ctx context.Context, log *slog.Logger, g *config.ModelGroup, e scheduler.BatchEntry) error {
	b, err := w.d.Upstream.GetBatch(ctx, e.ID)
	var ue *upstream.Error
	if errors.As(err, &ue) && ue.Status == http.StatusNotFound {
		// The batch is gone upstream (deleted by hand): its answers will
		// never come, and its jobs go by the Messages API.
		log.Warn("a batch is gone upstream; its jobs go by the Messages API")
		if !e.Adopted {
			for _, bj := range e.Jobs {
				w.batchRequeue(context.WithoutCancel(ctx), log, g, bj.ID, e, "batch_lost")
			}
		}
		return w.d.Scheduler.BatchDone(ctx, g.Name, e.ID)
	}
	if err != nil {
		return err
	}
	if !b.Ended() {
		if e.Cancel || e.Adopted || b.Status != "in_progress" {
			return nil
		}
		n, err := w.d.Scheduler.BatchRunning(ctx, g.Name, e.ID)
		if err != nil || n > 0 {
			return err
		}
		// Every job of the batch was canceled: so is the batch.
		if _, err := w.d.Upstream.CancelBatch(ctx, e.ID); err != nil {
			return err
		}
		_, err = w.d.Scheduler.MarkBatchCanceled(ctx, g.Name, e.ID)
		log.Info("every job of a batch was canceled; batch canceled upstream")
		return err
	}
	bg := context.WithoutCancel(ctx)
	seen := map[string]bool{}
	err = w.d.Upstream.BatchResults(ctx, e.ID, func(r upstream.BatchResult) error {
		seen[r.CustomID] = true
		return w.batchResult(bg, log, g, e, r)
	})
	if err != nil {
		return err
	}
	if !e.Adopted {
		for _, bj := range e.Jobs {
			if !seen[bj.ID] {
				w.batchRequeue(bg, log, g, bj.ID, e, "batch_result_missing")
			}
		}
	}
	log.Info("batch ended; its results are in", "results", len(seen))
	return w.d.Scheduler.BatchDone(bg, g.Name, e.ID)
}

// batchJob reads job id for a step of batch e: nil when it is not one of
// e's jobs in g (another group's, or a claim's job another batch took).
// A job of the batch whose attempt was never started (its worker died
// first) is started now.
func (w *Worker) batchJob(ctx context.Context, g *config.ModelGroup, e scheduler.BatchEntry, id string) (*jobs.Job, error) {
	job, err := w.d.Store.Get(ctx, id)
	if errors.Is(err, jobs.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if job.Group != g.Name || job.Via != "batch" {
		return nil, nil
	}
	if job.BatchID != e.ID && !(e.Adopted && job.BatchID == "" && slices.Contains(e.Claims, job.BatchClaim)) {
		return nil, nil
	}
	if job.Status == jobs.Running {
		a := scheduler.Attempt{Group: g, Job: job, Dispatch: job.Dispatch}
		if _, err := w.d.Scheduler.StartBatched(ctx, a, e.ID, w.now()); err == nil {
			if job, err = w.d.Store.Get(ctx, id); err != nil {
				return nil, err
			}
		} else if !refused(err) && !errors.Is(err, scheduler.ErrAttemptRunning) {
			return nil, err
		}
	}
	return job, nil
}

// batchResult finishes a job of batch e from its result r.
func (w *Worker) batchResult(ctx context.Context, log *slog.Logger, g *config.ModelGroup, e scheduler.BatchEntry, r upstream.BatchResult) error {
	job, err := w.batchJob(ctx, g, e, r.CustomID)
	if err != nil || job == nil {
		return err
	}
	log = log.With("job_id", job.ID)
	a := scheduler.Attempt{Group: g, Job: job, Dispatch: job.Dispatch}
	now := w.now()
	policy := w.policy(job)
	switch r.Type {
	case "succeeded":
		u := jobs.Usage(r.Usage)
		s := scheduler.Success{
			Attempt: a, Result: r.Message, Text: r.Text, Usage: u,
			Used: scheduler.Used{Requests: 1, Input: inputCounted(g, r.Usage), Output: r.Usage.OutputTokens},
			At:   now, Policy: policy,
		}
		call := w.batchTallies(job, u, now)
		s.Tallies = append(call, w.tallies(job, true, now)...)
		err := w.d.Scheduler.Succeed(ctx, s)
		var se *jobs.StateError
		switch {
		case err == nil:
			w.d.Metrics.Finished(g.Name, string(jobs.Succeeded))
			w.d.Metrics.Tokens(g.Name, u.InputTokens, u.OutputTokens, u.CacheReadInputTokens, u.CacheCreationInputTokens)
			log.Info("job succeeded in its batch", "input_tokens", u.InputTokens, "output_tokens", u.OutputTokens)
		case errors.As(err, &se) && se.Current.Terminal() && se.Current != jobs.Succeeded:
			// Canceled while its batch ran: the answer is not kept, what it
			// cost is.
			j := *job
			j.Status = se.Current
			return w.batchStop(ctx, g, &j, s.Used, call)
		case refused(err):
		default:
			return err
		}
	case "errored":
		if job.Status.Terminal() {
			return w.batchStop(ctx, g, job, scheduler.Used{}, nil)
		}
		if r.ErrorType == "api_error" || r.ErrorType == "overloaded_error" {
			w.batchRequeue(ctx, log, g, job.ID, e, "batch_errored")
			return nil
		}
		err := w.d.Scheduler.Fail(ctx, scheduler.Failure{Attempt: a, At: now, Policy: policy,
			Error:   jobs.Error{Type: r.ErrorType, Message: "The Message Batches API could not answer this request: " + r.ErrorMessage},
			Tallies: w.tallies(job, false, now)})
		if err == nil {
			w.d.Metrics.Finished(g.Name, string(jobs.Failed))
		} else if !refused(err) {
			return err
		}
	case "canceled":
		if job.Status.Terminal() {
			return w.batchStop(ctx, g, job, scheduler.Used{}, nil)
		}
		// Canceled upstream by someone else: the job goes by the
		// Messages API.
		w.batchRequeue(ctx, log, g, job.ID, e, "batch_canceled")
	case "expired":
		if job.Status.Terminal() {
			return w.batchStop(ctx, g, job, scheduler.Used{}, nil)
		}
		err := w.d.Scheduler.ExpireBatched(ctx, scheduler.Failure{Attempt: a, At: now, Policy: policy,
			Error: jobs.Error{Type: "batch_expired",
				Message: "The Message Batch this request was sent in expired (24 hours) before the request was processed. Send it again, without a deadline or as interactive to use the Messages API."},
			Tallies: w.tallies(job, false, now)})
		if err == nil {
			w.d.Metrics.Finished(g.Name, string(jobs.Expired))
		} else if !refused(err) {
			return err
		}
	}
	return nil
}

// batchStop settles the batch attempt of a job that ended (canceled)
// while its batch ran, with what its request used.
func (w *Worker) batchStop(ctx context.Context, g *config.ModelGroup, j *jobs.Job, u scheduler.Used, call []jobs.Tally) error {
	err := w.d.Scheduler.Stop(ctx, scheduler.Stopped{
		Attempt: scheduler.Attempt{Group: g, Job: j, Dispatch: j.Dispatch},
		Used:    u, Policy: w.policy(j), Tallies: call,
	})
	if err != nil && !refused(err) {
		return err
	}
	return nil
}

// batchRequeue puts job id of batch e, still running, in the Messages
// line (first in its lane): its batch will not answer it.
func (w *Worker) batchRequeue(ctx context.Context, log *slog.Logger, g *config.ModelGroup, id string, e scheduler.BatchEntry, reason string) {
	job, err := w.batchJob(ctx, g, e, id)
	if err != nil || job == nil || job.Status != jobs.Running {
		if err != nil {
			log.Warn("could not read a job of a batch", "job_id", id, "err", err)
		}
		return
	}
	_, err = w.d.Scheduler.Retry(ctx, scheduler.Retry{
		Attempt: scheduler.Attempt{Group: g, Job: job, Dispatch: job.Dispatch},
		Reason:  reason, Fields: []string{"via", ""},
	})
	if err != nil && !refused(err) {
		log.Warn("could not put a job of a batch in the Messages line", "job_id", id, "err", err)
		return
	}
	log.Info("job of a batch goes by the Messages API", "job_id", id, "reason", reason)
}

// batchTallies are the usage statistics of a request answered in a batch
// (priced with the batch discount).
func (w *Worker) batchTallies(j *jobs.Job, u jobs.Usage, now time.Time) []jobs.Tally {
	if w.d.Usage == nil {
		return nil
	}
	return w.d.Usage.CallTallies(usage.Call{Group: j.Group, Tenant: j.Tenant, UserID: j.UserID,
		JobID: j.ID, Model: j.Model, Usage: u, At: now, Batch: true})
}

// recoverClaim looks upstream for the batch of claim c, never recorded:
// batches created about when it was made that the group does not know are
// adopted (their results finish the claim's jobs they hold); once none is
// left to check, the claim's other jobs go back in line.
func (w *Worker) recoverClaim(ctx context.Context, log *slog.Logger, g *config.ModelGroup, c scheduler.BatchClaim) error {
	_, _, _, _, poll := g.BatchSettings()
	if len(c.Adopted) > 0 {
		for _, id := range c.Adopted {
			if known, err := w.d.Scheduler.HasBatch(ctx, g.Name, id); err != nil || known {
				return err
			}
		}
		n, err := w.d.Scheduler.ReturnBatch(ctx, g.Name, c.ID)
		if n > 0 {
			log.Info("jobs of a lost batch's claim that no batch held go back in line", "claim", c.ID, "jobs", n)
		}
		return err
	}
	list, err := w.d.Upstream.ListBatches(ctx, c.At.Add(-time.Minute))
	if err != nil {
		return err
	}
	found := 0
	for _, b := range list {
		if b.CreatedAt.After(c.At.Add(batchCreateTimeout + time.Minute)) {
			continue
		}
		adopted, err := w.d.Scheduler.AdoptBatch(ctx, g.Name, c.ID, b.ID, poll)
		if err != nil {
			return err
		}
		if !adopted {
			continue
		}
		found++
		log.Info("a batch created about when a claim was made, never recorded, is checked for its jobs", "claim", c.ID, "batch_id", b.ID)
	}
	if found == 0 {
		n, err := w.d.Scheduler.ReturnBatch(ctx, g.Name, c.ID)
		if n > 0 {
			log.Info("jobs of a claim whose batch was never created go back in line", "claim", c.ID, "jobs", n)
		}
		return err
	}
	return nil
}
